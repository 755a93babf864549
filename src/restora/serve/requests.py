"""Request bodies in, typed requests out: everything the API checks about what a client sends.

`RequestParser` holds what validation depends on (the limits, the base's name, the resident adapters,
the tokenizer) and turns a body into a `CompletionRequest` or an `AdapterRequest`, raising `APIError`
(400, 404, 413) for the first thing wrong. Checks run in a fixed order, so a body with several faults
is always refused for the same one. A completion's prompt is checked and tokenized last, by
`prompt_ids`, which the app runs on a worker thread: a large prompt does not hold up the event loop.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from fastapi import Request

from restora.serve.adapters_root import (
    AdapterPathError,
    ResidentAdapters,
    public_message,
)
from restora.serve.engine import SamplingParams
from restora.serve.errors import APIError, show

__all__ = ["ServeLimits", "CompletionRequest", "AdapterRequest", "RequestParser", "MAX_STOP_CHARS"]

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


@dataclass(frozen=True)
class CompletionRequest:
    """A checked /v1/completions or /v1/chat/completions body whose prompt is not yet tokenized."""

    chat: bool
    model: str  # as the client named it: every response echoes it
    adapter: str | None  # None: the base
    params: SamplingParams
    stream: bool
    include_usage: bool  # streaming: a last chunk with the token counts
    prompt: Any  # "messages" (chat) or "prompt" as sent; prompt_ids checks and tokenizes it


@dataclass(frozen=True)
class AdapterRequest:
    """A checked /v1/load_lora_adapter or /v1/unload_lora_adapter body."""

    name: str
    path: str | None = None  # load only: relative to the adapters root, known to stay inside it


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _flag(body: dict[str, Any], key: str, default: bool = False) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise APIError(400, f"{key} must be true or false, got {show(v)}", param=key)
    return v


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    v = body.get(key, default)
    v = default if v is None else v
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise APIError(400, f"{key} must be a number in [{lo}, {hi}], got {show(v)}", param=key)
    return float(v)


def _sampling(body: dict[str, Any], chat: bool, max_tokens_limit: int) -> SamplingParams:
    """n, max_tokens (chat: max_completion_tokens first), stop, seed, temperature, top_p, ignore_eos."""
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1 or not isinstance(n, int)):
        raise APIError(400, "only n = 1 is supported", param="n")
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    mt = body.get(key)
    mt = (max_tokens_limit if chat else 16) if mt is None else mt  # OpenAI's defaults: chat unbounded, completions 16
    if isinstance(mt, bool) or not isinstance(mt, int) or not 1 <= mt <= max_tokens_limit:
        raise APIError(400, f"{key} must be an integer in [1, {max_tokens_limit}], got {show(mt)}", param=key)
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 16 or \
            not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop):
        raise APIError(400, f"stop must be a string or a list of up to 16 strings of 1 to {MAX_STOP_CHARS} "
                       "characters", param="stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise APIError(400, f"seed must be an integer, got {show(seed)}", param="seed")
    return SamplingParams(max_tokens=mt, temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                          top_p=_number(body, "top_p", 1.0, 1e-9, 1.0), stop=tuple(stop),
                          seed=None if seed is None else seed % 2**63, ignore_eos=_flag(body, "ignore_eos"))


def _chat_messages(msgs: Any) -> list[dict[str, str]]:
    """The messages as {"role", "content"} with text content; content parts are joined into one string."""
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
    return clean


class RequestParser:
    """Turns request bodies into typed requests against one server's limits, base, adapters and tokenizer."""

    def __init__(self, limits: ServeLimits, base_name: str, resident: ResidentAdapters, tok: Any) -> None:
        self.limits, self.base_name, self.resident, self.tok = limits, base_name, resident, tok

    async def read_json(self, request: Request) -> dict[str, Any]:
        """The body as a JSON object, read no further than the body limit (413 past it)."""
        cap = self.limits.max_body_bytes
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

    def completion(self, body: dict[str, Any], chat: bool) -> CompletionRequest:
        """Everything but the prompt: model, sampling, stream and stream_options."""
        adapter = self._adapter_of(body)
        params = _sampling(body, chat, self.limits.max_tokens_limit)
        stream = _flag(body, "stream")
        options = body.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise APIError(400, f"stream_options must be an object, got {show(options)}", param="stream_options")
        return CompletionRequest(chat=chat, model=body["model"], adapter=adapter, params=params, stream=stream,
                                 include_usage=_flag(options or {}, "include_usage"),
                                 prompt=body.get("messages") if chat else body.get("prompt"))

    def prompt_ids(self, req: CompletionRequest) -> list[int]:
        """The prompt's token ids: chat messages through the tokenizer's chat template, a prompt as given."""
        if req.chat:
            param = "messages"
            ids = self._encode(self._chat_text(req.prompt), param, special=False)
        else:
            param = "prompt"
            p = req.prompt[0] if isinstance(req.prompt, list) and len(req.prompt) == 1 else req.prompt
            if not isinstance(p, str) or not p:
                raise APIError(400, "prompt must be a non-empty string (or a list of exactly one)", param="prompt")
            ids = self._encode(p, param, special=True)
        if not ids:
            raise APIError(400, f"{param} encodes to no tokens", param=param)
        if len(ids) > self.limits.max_prompt_tokens:
            raise APIError(400, f"{param} has {len(ids)} tokens, the limit is {self.limits.max_prompt_tokens}",
                           param=param, code="context_length_exceeded")
        return ids

    def load_adapter(self, body: dict[str, Any]) -> AdapterRequest:
        """lora_name and lora_path (default: the name); an unsafe path is refused before anything is read."""
        name, path = self._lora_name(body), body.get("lora_path", body.get("lora_name"))
        try:
            self.resident.root.resolve(path)
        except AdapterPathError as e:
            raise APIError(400, str(e), param="lora_path", code="invalid_adapter_path") from None
        return AdapterRequest(name, path)

    def unload_adapter(self, body: dict[str, Any]) -> AdapterRequest:
        return AdapterRequest(self._lora_name(body))

    def _adapter_of(self, body: dict[str, Any]) -> str | None:
        """The adapter `model` names (None: the base); 404 for a name that is neither."""
        name = body.get("model")
        if not isinstance(name, str) or not name or len(name) > 256:
            raise APIError(400, "model must be the base's name or an adapter's name", param="model")
        if name == self.base_name:
            return None
        try:
            known = self.resident.known(name)
        except AdapterPathError as e:
            raise APIError(400, str(e), param="model", code="invalid_adapter_path") from None
        if not known:
            raise APIError(404, f"the model {show(name)} does not exist: neither the base {self.base_name!r} nor an "
                           "adapter under the adapters root", param="model", code="model_not_found")
        return name

    def _chat_text(self, msgs: Any) -> str:
        clean = _chat_messages(msgs)
        if getattr(self.tok, "chat_template", None) is None:
            raise APIError(400, f"the tokenizer of {self.base_name} has no chat template: use /v1/completions",
                           param="messages")
        try:
            return self.tok.apply_chat_template(clean, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 -- the template refuses these messages (roles, order)
            raise APIError(400, f"the chat template refuses these messages: {public_message(str(e))[:200]}",
                           param="messages") from None

    def _encode(self, text: str, param: str, special: bool) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, f"{param} is not valid Unicode (it holds a lone surrogate)", param=param) from None
        try:
            return list(self.tok(text, add_special_tokens=special)["input_ids"])
        except Exception as e:  # noqa: BLE001 -- the tokenizer's own refusal of this text
            raise APIError(400, f"{param} cannot be tokenized: {type(e).__name__}", param=param) from None

    def _lora_name(self, body: dict[str, Any]) -> str:
        name = body.get("lora_name")
        if not isinstance(name, str) or len(name) > 256 or name == self.base_name:
            raise APIError(400, "lora_name must be a string other than the base's name", param="lora_name")
        try:
            return self.resident.root.check_name(name)
        except AdapterPathError as e:
            raise APIError(400, str(e), param="lora_name") from None
