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
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from restora.serve.adapters_root import AdapterBusyError, AdapterLoadError, AdapterPathError, public_message
from restora.serve.engine import Engine, EngineStoppedError, QueueFullError, Request as GenRequest, SamplingParams

__all__ = ["ServeLimits", "ServerInfo", "APIError", "create_app"]

log = logging.getLogger("restora.serve")

MAX_STOP_CHARS = 256  # per stop string: the stream's hold-back check costs its length per token


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask for."""

    max_tokens_limit: int = 512
    max_prompt_tokens: int = 2048
    max_body_bytes: int = 1_000_000

    def __post_init__(self) -> None:
        for k, v in asdict(self).items():
            if v < 1:
                raise ValueError(f"{k} must be >= 1, got {v}")


@dataclass
class ServerInfo:
    """What /v1/models and /health report about the base."""

    base_name: str
    format: str
    bits: int
    group_size: int
    plan: dict[str, Any] = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        message = message if len(message) <= 1000 else message[:997] + "..."
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type, param, code, headers

    def response(self) -> Response:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        # ASCII JSON: a lone surrogate quoted from the client cannot make the error itself fail to encode
        return Response(json.dumps(body), status_code=self.status, headers=self.headers, media_type="application/json")


def _show(v: Any) -> str:
    """A client's value for an error message: its repr, at most 60 characters."""
    try:
        r = repr(v)
    except (RecursionError, ValueError):  # deeply nested or a huge integer
        r = f"<{type(v).__name__}>"
    return r if len(r) <= 60 else r[:57] + "..."


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _flag(body: dict[str, Any], key: str, default: bool = False) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise APIError(400, f"{key} must be true or false, got {_show(v)}", param=key)
    return v


class _EngineStream(StreamingResponse):
    """An SSE response that tells the engine when it ends for any reason (done or client gone)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    v = body.get(key, default)
    v = default if v is None else v
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise APIError(400, f"{key} must be a number in [{lo}, {hi}], got {_show(v)}", param=key)
    return float(v)


def create_app(engine: Engine, info: ServerInfo, limits: ServeLimits, drain_timeout: float | None = 30.0) -> FastAPI:
    """The FastAPI app over a started `engine`; the engine drains when the app shuts down, for at most
    `drain_timeout` seconds (then what is left is answered 503)."""
    tok = engine.tok
    resident = engine.adapters
    tokenizing = ThreadPoolExecutor(1, thread_name_prefix="restora-tokenize")  # one: fast tokenizers share state

    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        # uvicorn has let in-flight requests finish (or cancelled them after its graceful timeout); drain the rest
        await asyncio.to_thread(engine.stop, drain_timeout)
        tokenizing.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="restora", lifespan=lifespan)  # type: ignore[arg-type]

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return exc.response()

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception) -> Response:  # a bug: OpenAI's body, no traceback
        log.error("unhandled error on %s", request.url.path, exc_info=exc)
        return APIError(500, f"internal error ({type(exc).__name__})", type="server_error").response()

    async def read_json(request: Request) -> dict[str, Any]:
        cap = limits.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > cap:
            raise APIError(413, f"request body of {length} bytes exceeds the limit of {cap}", code="body_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > cap:
                raise APIError(413, f"request body exceeds the limit of {cap} bytes", code="body_too_large")
        try:
            data = json.loads(body, parse_constant=_reject_constant)
        except RecursionError:
            raise APIError(400, "request body is not valid JSON: nested too deeply", code="invalid_json") from None
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, NaN/Infinity, integers past Python's digit limit
            raise APIError(400, f"request body is not valid JSON: {public_message(str(e))[:200]}",
                           code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, f"request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
        return data

    def adapter_of(body: dict[str, Any]) -> str | None:
        name = body.get("model")
        if not isinstance(name, str) or not name or len(name) > 256:
            raise APIError(400, "model must be the base's name or an adapter's name", param="model")
        if name == info.base_name:
            return None
        try:
            known = resident.known(name)
        except AdapterPathError as e:
            raise APIError(400, str(e), param="model", code="invalid_adapter_path") from None
        if not known:
            raise APIError(404, f"the model {_show(name)} does not exist: neither the base {info.base_name!r} nor an adapter "
                           "under the adapters root", param="model", code="model_not_found")
        return name

    def sampling(body: dict[str, Any], chat: bool) -> SamplingParams:
        n = body.get("n")
        if n is not None and (isinstance(n, bool) or n != 1 or not isinstance(n, int)):
            raise APIError(400, "only n = 1 is supported", param="n")
        key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        mt = body.get(key)
        mt = (limits.max_tokens_limit if chat else 16) if mt is None else mt
        if isinstance(mt, bool) or not isinstance(mt, int) or not 1 <= mt <= limits.max_tokens_limit:
            raise APIError(400, f"{key} must be an integer in [1, {limits.max_tokens_limit}], got {_show(mt)}", param=key)
        stop = body.get("stop")
        stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > 16 or \
                not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop):
            raise APIError(400, f"stop must be a string or a list of up to 16 strings of 1 to {MAX_STOP_CHARS} "
                           "characters", param="stop")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise APIError(400, f"seed must be an integer, got {_show(seed)}", param="seed")
        return SamplingParams(max_tokens=mt, temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                              top_p=_number(body, "top_p", 1.0, 1e-9, 1.0), stop=tuple(stop),
                              seed=None if seed is None else seed % 2**63, ignore_eos=_flag(body, "ignore_eos"))

    def encode(text: str, param: str, special: bool) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, f"{param} is not valid Unicode (it holds a lone surrogate)", param=param) from None
        try:
            return list(tok(text, add_special_tokens=special)["input_ids"])
        except Exception as e:  # noqa: BLE001 -- the tokenizer's own refusal of this text
            raise APIError(400, f"{param} cannot be tokenized: {type(e).__name__}", param=param) from None

    def prompt_ids(body: dict[str, Any], chat: bool) -> list[int]:
        if chat:
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs:
                raise APIError(400, "messages must be a non-empty list", param="messages")
            clean = []
            for m in msgs:
                content = m.get("content") if isinstance(m, dict) else None
                if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                    if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                               for p in content):
                        raise APIError(400, "content parts must be {\"type\": \"text\", \"text\": string}: only text is "
                                       "supported", param="messages")
                    content = "".join(p["text"] for p in content)
                if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(content, str):
                    raise APIError(400, "each message needs a string role and text content", param="messages")
                clean.append({"role": m["role"], "content": content})
            if getattr(tok, "chat_template", None) is None:
                raise APIError(400, f"the tokenizer of {info.base_name} has no chat template: use /v1/completions",
                               param="messages")
            try:
                text = tok.apply_chat_template(clean, tokenize=False, add_generation_prompt=True)
            except Exception as e:  # noqa: BLE001 -- the template refuses these messages (roles, order)
                raise APIError(400, f"the chat template refuses these messages: {public_message(str(e))[:200]}",
                               param="messages") from None
            ids = encode(text, "messages", special=False)
            param = "messages"
        else:
            p = body.get("prompt")
            if isinstance(p, list) and len(p) == 1:
                p = p[0]
            if not isinstance(p, str) or not p:
                raise APIError(400, "prompt must be a non-empty string (or a list of exactly one)", param="prompt")
            ids = encode(p, "prompt", special=True)
            param = "prompt"
        if not ids:
            raise APIError(400, f"{param} encodes to no tokens", param=param)
        if len(ids) > limits.max_prompt_tokens:
            raise APIError(400, f"{param} has {len(ids)} tokens, the limit is {limits.max_prompt_tokens}", param=param,
                           code="context_length_exceeded")
        return ids

    async def next_event(queue: asyncio.Queue, request: Request, req: GenRequest) -> tuple[Any, ...]:
        """The engine's next event; cancels the request if the client goes away meanwhile."""
        while True:
            try:
                return await asyncio.wait_for(queue.get(), timeout=0.5)
            except (TimeoutError, asyncio.TimeoutError):  # distinct classes before Python 3.11
                if await request.is_disconnected():
                    engine.cancel(req)
                    raise asyncio.CancelledError from None

    async def complete(request: Request, chat: bool) -> Any:
        body = await read_json(request)
        adapter = adapter_of(body)
        params = sampling(body, chat)
        stream = _flag(body, "stream")
        options = body.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise APIError(400, f"stream_options must be an object, got {_show(options)}", param="stream_options")
        include_usage = _flag(options or {}, "include_usage")
        loop = asyncio.get_running_loop()
        ids = await loop.run_in_executor(tokenizing, prompt_ids, body, chat)  # off the event loop
        queue: asyncio.Queue = asyncio.Queue()
        req = GenRequest(ids, adapter, params, lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev), stream)
        try:
            engine.submit(req)
        except QueueFullError as e:
            raise APIError(429, f"server busy: {e}", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except EngineStoppedError as e:
            raise APIError(503, str(e), type="server_error", code="shutting_down") from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        name, created = body["model"], int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        usage = lambda n: {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}  # noqa: E731
        finished = False
        try:
            first = await next_event(queue, request, req)
            if first[0] == "error":
                finished = True
                raise APIError(first[1], first[2], type="server_error" if first[1] >= 500 else "invalid_request_error")
            if not stream:
                finished = True
                _, reason, text, n = first
                choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason} if chat
                          else {"index": 0, "text": text, "logprobs": None, "finish_reason": reason})
                return {"id": rid, "object": obj, "created": created, "model": name, "choices": [choice],
                        "usage": usage(n)}
        finally:
            if not finished and not stream:
                engine.cancel(req)

        def chunk(text: str | None, reason: str | None, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
                c = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            else:
                c = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
            d = {"id": rid, "object": obj + (".chunk" if chat else ""), "created": created, "model": name, "choices": [c]}
            return f"data: {json.dumps(d)}\n\n"

        async def events() -> AsyncIterator[str]:
            ev = first
            if chat:
                yield chunk(None, None, role=True)
            while True:
                if ev[0] == "delta":
                    yield chunk(ev[1], None)
                elif ev[0] == "done":
                    yield chunk(None, ev[1])
                    if include_usage:
                        d = {"id": rid, "object": obj + (".chunk" if chat else ""), "created": created, "model": name,
                             "choices": [], "usage": usage(ev[3])}
                        yield f"data: {json.dumps(d)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                else:  # an error after the stream started: report it in-band, as OpenAI does
                    yield f"data: {json.dumps({'error': {'message': ev[2], 'type': 'server_error', 'param': None, 'code': None}})}\n\n"
                    return
                ev = await queue.get()

        # cancelling a finished request is a no-op; an unfinished one (client gone) frees its row
        return _EngineStream(events(), on_close=lambda: engine.cancel(req))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await complete(request, chat=True)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        base = {"id": info.base_name, "object": "model", "created": info.created, "owned_by": "restora",
                "root": info.base_name, "parent": None, "format": info.format, "bits": info.bits,
                "group_size": info.group_size}
        data = [base] + [{"id": n, "object": "model", "created": info.created, "owned_by": "restora",
                          "root": info.base_name, "parent": info.base_name, "format": info.format, "bits": info.bits}
                         for n in list(resident.names)]
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        s = engine.stats()
        return {"status": "draining" if s["draining"] else "ok", "ready": not s["draining"], "model": info.base_name,
                "base": {"format": info.format, "bits": info.bits, "group_size": info.group_size},
                "plan": info.plan, "engine": s,
                "adapters": {"loaded": list(resident.names), "max_loaded": resident.max_loaded,
                             "evictions": resident.evictions},
                "limits": asdict(limits), "max_batch": engine.config.max_batch, "max_queue": engine.config.max_queue}

    async def on_engine(fn: Callable[[], Any]) -> Any:
        if engine.stats()["draining"]:
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        try:
            return await asyncio.wrap_future(engine.call(fn))
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

    def lora_name(body: dict[str, Any]) -> str:
        name = body.get("lora_name")
        if not isinstance(name, str) or len(name) > 256 or name == info.base_name:
            raise APIError(400, "lora_name must be a string other than the base's name", param="lora_name")
        try:
            return resident.root.check_name(name)
        except AdapterPathError as e:
            raise APIError(400, str(e), param="lora_name") from None

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> Any:
        body = await read_json(request)
        name, path = lora_name(body), body.get("lora_path", body.get("lora_name"))
        try:
            resident.root.resolve(path)  # refuse unsafe paths here, before the engine reads anything
        except AdapterPathError as e:
            raise APIError(400, str(e), param="lora_path", code="invalid_adapter_path") from None
        slot = await on_engine(lambda: resident.load(name, path, engine.pinned()))
        return {"status": "loaded", "lora_name": name, "slot": slot}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> Any:
        body = await read_json(request)
        name = lora_name(body)
        await on_engine(lambda: resident.unload(name, engine.pinned()))
        return {"status": "unloaded", "lora_name": name}

    return app
