"""The HTTP API: OpenAI-compatible completions over one base and many LoRA adapters (FastAPI).

    POST /v1/completions            prompt -> text, non-streaming or SSE (`stream: true`)
    POST /v1/chat/completions       messages -> the tokenizer's chat template -> text
    GET  /v1/models                 the base (format, bits) and the resident adapters
    GET  /health                    readiness, queue, and the memory plan in force (PLR's l)
    POST /v1/load_lora_adapter      {"lora_name", "lora_path"} as vLLM; the path stays in the root
    POST /v1/unload_lora_adapter    {"lora_name"}

A request's `model` is the base's name or an adapter's; an adapter not resident is loaded on
first use from `<adapters-root>/<name>` (restora.serve.adapters_root). Every generation goes
through the one Engine (restora.serve.engine), so requests for different adapters share
forward passes. Errors use OpenAI's body {"error": {"message", "type", "param", "code"}}:
400 bad input (malformed JSON, wrong types, limits, unsafe adapter paths, adapters that cannot be
loaded), 404 unknown model, 409 busy adapter, 413 body too large, 429 full queue (with
Retry-After), 503 shutting down; a 5xx is the server's fault, never the client's. Messages quote
client values shortened and name adapters, never server paths. Prompts are tokenized on a worker
thread, so a large prompt does not hold up the event loop (/health, other clients' streams).

This module wires the endpoints to their parts: restora.serve.requests checks bodies into typed
requests, restora.serve.responses formats answers and streams, restora.serve.errors holds APIError
and the error handlers; `_Handlers` does each endpoint's work against the engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI, Request

from restora.serve.adapters_root import (
    AdapterBusyError,
    AdapterLoadError,
    AdapterPathError,
    public_message,
)
from restora.serve.engine import Engine, EngineStoppedError, QueueFullError
from restora.serve.engine import Request as GenRequest
from restora.serve.errors import APIError, api_error_handler, server_error_handler
from restora.serve.requests import RequestParser, ServeLimits
from restora.serve.responses import (
    EngineStream,
    Reply,
    ServerInfo,
    health_body,
    models_body,
    sse_events,
)

__all__ = ["ServeLimits", "ServerInfo", "APIError", "create_app"]


class _Handlers:
    """Each endpoint's work over one started engine: parse the request, run it, format the answer."""

    def __init__(self, engine: Engine, info: ServerInfo, limits: ServeLimits) -> None:
        self.engine, self.info, self.limits = engine, info, limits
        self.parse = RequestParser(limits, info.base_name, engine.adapters, engine.tok)
        # one thread: fast tokenizers share state
        self.tokenizing = ThreadPoolExecutor(1, thread_name_prefix="restora-tokenize")

    async def complete(self, request: Request, chat: bool) -> Any:
        """A completion: the whole body, or an SSE stream once the engine's first event is in."""
        body = await self.parse.read_json(request)
        req = self.parse.completion(body, chat)
        loop = asyncio.get_running_loop()
        ids = await loop.run_in_executor(self.tokenizing, self.parse.prompt_ids, req)  # off the event loop
        queue: asyncio.Queue = asyncio.Queue()
        gen = GenRequest(ids, req.adapter, req.params, lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev),
                         req.stream)
        self._submit(gen)
        reply = Reply.new(chat, req.model, len(ids))
        finished = False
        try:
            first = await self._next_event(queue, request, gen)
            if first[0] == "error":
                finished = True
                raise APIError(first[1], first[2], type="server_error" if first[1] >= 500 else "invalid_request_error")
            if not req.stream:
                finished = True
                _, reason, text, n = first
                return reply.body(text, reason, n)
        finally:
            if not finished and not req.stream:  # not answered (client gone): free its row
                self.engine.cancel(gen)
        # cancelling a finished request is a no-op; an unfinished one (client gone) frees its row
        return EngineStream(sse_events(reply, first, queue, req.include_usage),
                            on_close=lambda: self.engine.cancel(gen))

    def _submit(self, gen: GenRequest) -> None:
        try:
            self.engine.submit(gen)
        except QueueFullError as e:
            raise APIError(429, f"server busy: {e}", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except EngineStoppedError as e:
            raise APIError(503, str(e), type="server_error", code="shutting_down") from None

    async def _next_event(self, queue: asyncio.Queue, request: Request, gen: GenRequest) -> tuple[Any, ...]:
        """The engine's next event; cancels the request if the client goes away meanwhile."""
        while True:
            try:
                return await asyncio.wait_for(queue.get(), timeout=0.5)
            except (TimeoutError, asyncio.TimeoutError):  # distinct classes before Python 3.11
                if await request.is_disconnected():
                    self.engine.cancel(gen)
                    raise asyncio.CancelledError from None

    async def load_adapter(self, request: Request) -> dict[str, Any]:
        req = self.parse.load_adapter(await self.parse.read_json(request))
        resident = self.engine.adapters
        slot = await self._on_engine(lambda: resident.load(req.name, req.path, self.engine.pinned()))
        return {"status": "loaded", "lora_name": req.name, "slot": slot}

    async def unload_adapter(self, request: Request) -> dict[str, Any]:
        req = self.parse.unload_adapter(await self.parse.read_json(request))
        resident = self.engine.adapters
        await self._on_engine(lambda: resident.unload(req.name, self.engine.pinned()))
        return {"status": "unloaded", "lora_name": req.name}

    async def _on_engine(self, fn: Callable[[], Any]) -> Any:
        """fn() on the engine thread between steps, its adapter errors as the API's."""
        if self.engine.stats()["draining"]:
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        try:
            return await asyncio.wrap_future(self.engine.call(fn))
        except AdapterPathError as e:
            raise APIError(400, str(e), param="lora_path", code="invalid_adapter_path") from None
        except AdapterLoadError as e:
            raise APIError(400, str(e), param="lora_path", code="invalid_adapter") from None
        except AdapterBusyError as e:
            raise APIError(409, str(e), code="adapter_busy") from None
        except EngineStoppedError as e:
            raise APIError(503, str(e), type="server_error", code="shutting_down") from None
        except KeyError as e:
            raise APIError(404, str(e.args[0]), param="lora_name", code="model_not_found") from None
        except ValueError as e:
            raise APIError(400, public_message(str(e)), param="lora_path") from None


def create_app(engine: Engine, info: ServerInfo, limits: ServeLimits, drain_timeout: float | None = 30.0) -> FastAPI:
    """The FastAPI app over a started `engine`; the engine drains when the app shuts down, for at most
    `drain_timeout` seconds (then what is left is answered 503)."""
    handlers = _Handlers(engine, info, limits)

    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        # uvicorn has let in-flight requests finish (or cancelled them after its graceful timeout); drain the rest
        await asyncio.to_thread(engine.stop, drain_timeout)
        handlers.tokenizing.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="restora", lifespan=lifespan)  # type: ignore[arg-type]
    app.add_exception_handler(APIError, api_error_handler)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, server_error_handler)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await handlers.complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await handlers.complete(request, chat=True)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return models_body(info, list(engine.adapters.names))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return health_body(info, engine, limits)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> Any:
        return await handlers.load_adapter(request)

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> Any:
        return await handlers.unload_adapter(request)

    return app
