"""What the API answers, in OpenAI's format: completion bodies, SSE streams, /v1/models and /health.

A `Reply` formats one completion: the whole body when the request does not stream, else its
`data: {...}` chunks, which `sse_events` yields from the engine's events until "done" (then the
usage chunk if asked for, then `data: [DONE]`) or an error, which a started stream reports in-band
as OpenAI does. `EngineStream` is the streaming response that tells the engine when it ends.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from fastapi.responses import StreamingResponse

from restora.serve.engine import Engine
from restora.serve.requests import ServeLimits

__all__ = ["ServerInfo", "Reply", "EngineStream", "sse_events", "models_body", "health_body"]


@dataclass
class ServerInfo:
    """What /v1/models and /health report about the base."""

    base_name: str
    format: str
    bits: int
    group_size: int
    plan: dict[str, Any] = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass(frozen=True)
class Reply:
    """One completion's response: its id, creation time and model, and the prompt's length for usage."""

    chat: bool
    model: str
    prompt_tokens: int
    id: str
    created: int

    @classmethod
    def new(cls, chat: bool, model: str, prompt_tokens: int) -> Reply:
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        return cls(chat, model, prompt_tokens, rid, int(time.time()))

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def usage(self, n: int) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}

    def body(self, text: str, reason: str, n: int) -> dict[str, Any]:
        """The whole non-streaming response for `text`, `n` tokens that ended for `reason`."""
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason} if self.chat
                  else {"index": 0, "text": text, "logprobs": None, "finish_reason": reason})
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": [choice], "usage": self.usage(n)}

    def chunk(self, text: str | None, reason: str | None, role: bool = False) -> str:
        """One SSE chunk: new text, the finish reason, or (chat) the opening assistant role."""
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            c = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            c = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        return self._event(choices=[c])

    def usage_chunk(self, n: int) -> str:
        return self._event(choices=[], usage=self.usage(n))

    def _event(self, **fields: Any) -> str:
        d = {"id": self.id, "object": self.object + (".chunk" if self.chat else ""), "created": self.created,
             "model": self.model, **fields}
        return f"data: {json.dumps(d)}\n\n"


def _error_event(message: str) -> str:
    error = {"message": message, "type": "server_error", "param": None, "code": None}
    return f"data: {json.dumps({'error': error})}\n\n"


async def sse_events(reply: Reply, first: tuple[Any, ...], queue: asyncio.Queue,
                     include_usage: bool) -> AsyncIterator[str]:
    """The stream's chunks from the engine's events: `first`, then what arrives on `queue` until the end."""
    ev = first
    if reply.chat:
        yield reply.chunk(None, None, role=True)
    while True:
        if ev[0] == "delta":
            yield reply.chunk(ev[1], None)
        elif ev[0] == "done":
            yield reply.chunk(None, ev[1])
            if include_usage:
                yield reply.usage_chunk(ev[3])
            yield "data: [DONE]\n\n"
            return
        else:  # an error after the stream started: report it in-band, as OpenAI does
            yield _error_event(ev[2])
            return
        ev = await queue.get()


class EngineStream(StreamingResponse):
    """An SSE response that tells the engine when it ends for any reason (done or client gone)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def models_body(info: ServerInfo, adapters: list[str]) -> dict[str, Any]:
    """/v1/models: the base first, then the resident adapters as its children."""
    base = {"id": info.base_name, "object": "model", "created": info.created, "owned_by": "restora",
            "root": info.base_name, "parent": None, "format": info.format, "bits": info.bits,
            "group_size": info.group_size}
    data = [base] + [{"id": n, "object": "model", "created": info.created, "owned_by": "restora",
                      "root": info.base_name, "parent": info.base_name, "format": info.format, "bits": info.bits}
                     for n in adapters]
    return {"object": "list", "data": data}


def health_body(info: ServerInfo, engine: Engine, limits: ServeLimits) -> dict[str, Any]:
    """/health: readiness, the engine's queue and counts, the base and its memory plan, resident adapters, limits."""
    s = engine.stats()
    resident = engine.adapters
    return {"status": "draining" if s["draining"] else "ok", "ready": not s["draining"], "model": info.base_name,
            "base": {"format": info.format, "bits": info.bits, "group_size": info.group_size},
            "plan": info.plan, "engine": s,
            "adapters": {"loaded": list(resident.names), "max_loaded": resident.max_loaded,
                         "evictions": resident.evictions},
            "limits": asdict(limits), "max_batch": engine.config.max_batch, "max_queue": engine.config.max_queue}
