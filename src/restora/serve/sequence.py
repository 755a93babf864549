"""A request in flight through the engine (restora.serve.engine): its sampling settings, its tokens and text so
far, where its results go, and how stop strings cut and hold back its streamed text; the engine's settings and
the errors a submission can meet."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from restora.infer.generate import cut_at_stop

__all__ = ["EngineConfig", "EngineStoppedError", "QueueFullError", "Request", "SamplingParams", "cut_at_stop",
           "streamable_length"]


class QueueFullError(RuntimeError):
    """The waiting queue holds max_queue requests (HTTP 429)."""


class EngineStoppedError(RuntimeError):
    """The engine is draining for shutdown and takes no new requests (HTTP 503)."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request decodes."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # vLLM's extension: always generate max_tokens (benchmarks)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class EngineConfig:
    """Scheduler limits."""

    max_batch: int = 32  # rows decoded together
    max_queue: int = 256  # requests waiting to join the batch
    max_prefill_tokens: int = 2048  # rows x padded length of one prefill (one longer prompt still goes alone)
    bf16: bool = True  # bf16 autocast on CPU, as restora.infer.generate

    def __post_init__(self) -> None:
        if min(self.max_batch, self.max_queue, self.max_prefill_tokens) < 1:
            raise ValueError(f"max_batch, max_queue and max_prefill_tokens must be >= 1, got {self.max_batch}, "
                             f"{self.max_queue}, {self.max_prefill_tokens}")


@dataclass(eq=False)
class Request:
    """One completion: prompt token ids, the adapter (None: base) and where results go.

    emit receives ("delta", text) while streaming, then ("done", finish_reason, text, n_tokens)
    or ("error", status, message).
    """

    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams
    emit: Callable[[tuple[Any, ...]], None]
    stream: bool = False
    cancelled: bool = False
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of text already streamed
    slot: int = 0
    generator: torch.Generator | None = None
    failed: bool = False  # answered with an error while in the batch; its row leaves at the next _advance


def streamable_length(text: str, stops: Sequence[str]) -> int:
    """How much of `text` can be streamed: hold back a tail that may start a stop string or is a
    partial UTF-8 character."""
    n = len(text)
    for s in stops:
        for k in range(min(len(s) - 1, n), 0, -1):
            if text.endswith(s[:k]):
                n = min(n, len(text) - k)
                break
    while n > 0 and text[n - 1] == "\ufffd":
        n -= 1
    return n
