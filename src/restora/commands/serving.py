"""`restora serve`: one base at the precision the memory budget allows, many adapters, one HTTP API."""

from __future__ import annotations

import signal
import threading
from typing import Literal

from restora.commands.extras import require
from restora.serve.server import build_server

__all__ = ["serve"]


def serve(
    model: str,
    *,
    adapters_root: str,
    bits: str = "auto",
    format: Literal["float", "nf4", "fp4", "int8", "rtn", "gptq"] | None = None,
    memory_budget: str = "4GiB",
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 32,
    max_queue: int = 256,
    max_loaded_adapters: int = 8,
    max_tokens_limit: int = 512,
    max_prompt_tokens: int = 2048,
    max_body_bytes: int = 1_000_000,
    bf16: bool = True,
    allow_over_budget: bool = False,
    shutdown_timeout: float = 30.0,
    offload: bool = False,
) -> int:
    """Serve MODEL and the adapters under --adapters-root over an OpenAI-compatible HTTP API.

    Args:
        model: hub id, local HF folder, .gguf file, quantized checkpoint folder, or smollm2-135m.
        adapters_root: folder of adapter folders; a request's model NAME loads <root>/NAME, nothing outside is read.
        bits: base bits l: auto (the highest that fits --memory-budget) or 2, 3, 4, 8, 16.
        format: restrict the base format (auto: float, int8, nf4, rtn).
        memory_budget: memory for the base, resident adapters and KV cache, e.g. 4GiB, 512MiB.
        host: address to bind (127.0.0.1: this machine only).
        port: TCP port.
        max_batch: requests decoded together (continuous batching).
        max_queue: requests waiting to join the batch; beyond it requests get 429.
        max_loaded_adapters: adapters resident at once; the least recently used is evicted.
        max_tokens_limit: largest max_tokens a request may ask for.
        max_prompt_tokens: longest prompt in tokens.
        max_body_bytes: largest request body; larger ones get 413.
        bf16: decode under bf16 autocast on CPU.
        allow_over_budget: start even when the serve plan exceeds --memory-budget (otherwise a one-line error).
        offload: keep the base's decoder blocks in their file and page them in one block at a time (less memory,
            so --bits auto can pick a higher l; each step re-reads the weights from the page cache or the disk).
        shutdown_timeout: seconds SIGTERM / SIGINT waits for in-flight requests; then they are cancelled and the
            server exits.
    """
    if not shutdown_timeout >= 0:
        raise ValueError(f"--shutdown-timeout must be >= 0 seconds, got {shutdown_timeout}")
    uvicorn = require("uvicorn", "serve")
    app = build_server(model, adapters_root, bits, format, memory_budget, max_batch, max_queue, max_loaded_adapters,
                       max_tokens_limit, max_prompt_tokens, max_body_bytes, bf16, allow_over_budget=allow_over_budget,
                       drain_timeout=shutdown_timeout, offload=offload)
    # SIGTERM / SIGINT: stop accepting, let in-flight requests finish for up to shutdown_timeout seconds (uvicorn then
    # cancels them, which frees their engine rows), then drain the engine within the same bound.
    # uvicorn re-raises the signal it caught once it has shut down; a handler of ours turns that into exit code 0.
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: print(f"restora serve: drained, exiting on signal {signum}"))
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info",
                                timeout_graceful_shutdown=shutdown_timeout)).run()
    return 0
