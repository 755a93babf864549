"""Attention for decoding steps on CPU: a few new queries a row against its cached keys (attention_cpu.c).

restora.infer.decode attends T <= 16 new tokens a row (one for greedy steps, up to K+1 when verifying drafts) to
the row's cached keys. torch's CPU flash-attention kernel costs more in setup than in arithmetic at these
sizes: on SmolLM2-135M at batch 8 with ~120 cached positions, 116 us a layer, 3.5 ms of an 18 ms step
(2 threads, profiled). The native kernel reads the bf16 cache in place, computes each (row, head) in fp32
with one rounding of the output to bf16, and writes (B, T, heads * D), the layout the output projection
reads, so the transpose copy after SDPA goes too.

`attention` takes the native kernel for bf16 queries and caches on CPU with a head size that is a multiple
of 16 (up to 256) when it is available (restora.kernels.native: AVX-512 with BF16, a C compiler,
RESTORA_NATIVE unset or 1), and torch's `scaled_dot_product_attention` otherwise, so results agree within
bf16 rounding either way (tests/test_attention_kernel.py). It is the op `restora::attention_decode`, with
a fake implementation, so compiled decoding steps call it too.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
import torch.nn.functional as F

from restora.kernels import native

__all__ = ["MAX_QUERIES", "attention", "available"]

SOURCE = Path(__file__).with_name("attention_cpu.c")
FLAGS = ["-O3", "-fPIC", "-shared", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512bf16"]
CPU_FLAGS = ("avx512f", "avx512bw", "avx512_bf16")
MAX_QUERIES = 16  # queries a row the native kernel takes per call (decoding steps); longer inputs use SDPA
MAX_HEAD_DIM = 256  # attention_cpu.c's MAX_D


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = native.load(SOURCE, FLAGS, CPU_FLAGS, "the decoding attention kernel")
    if lib is None:
        return None
    p, i, n, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float
    native.bind(lib, "attention_decode", [p, p, p, p, p, i, i, i, i, i, i, n, n, n, n, n, n, n, n, n, n, n, f, i],
                "restora::attention_decode", _attention_decode)
    return lib


@torch.compiler.assume_constant_result  # a compiled graph takes the answer as given, never traces the build
def available() -> bool:
    """The native decoding attention is built and usable in this process."""
    return _library() is not None


torch.library.define("restora::attention_decode",
                     "(Tensor q, Tensor keys, Tensor values, Tensor mask, float scale) -> Tensor")


def _attention_decode(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                      scale: float) -> torch.Tensor:
    lib = _library()
    if lib is None:
        raise RuntimeError("restora::attention_decode: the native attention kernel is not available here "
                           "(restora.kernels.attention_decode.available() is False)")
    B, Hq, T, D = q.shape
    Hkv, E = keys.shape[1], keys.shape[2]
    if q.stride(-1) != 1:
        q = q.contiguous()
    m = mask.expand(B, 1, T, E)
    if m.stride(-1) != 1:
        m = m.contiguous()
    m = m.view(torch.uint8)
    out = torch.empty((B, T, Hq, D), dtype=torch.bfloat16)
    code = lib.attention_decode(q.data_ptr(), keys.data_ptr(), values.data_ptr(), m.data_ptr(), out.data_ptr(), B, Hq,
                                Hkv, T, E, D, *q.stride()[:3], *keys.stride()[:3], *values.stride()[:3], m.stride(0),
                                m.stride(2), scale, torch.get_num_threads())
    if code:
        raise MemoryError(f"restora::attention_decode: no memory for the scores of {E} keys")
    return out


@torch.library.register_fake("restora::attention_decode")
def _attention_decode_fake(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                           scale: float) -> torch.Tensor:
    B, Hq, T, D = q.shape
    return q.new_empty((B, T, Hq, D), dtype=torch.bfloat16)


def _native_fits(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> bool:
    return (q.device.type == "cpu" and keys.dtype == torch.bfloat16 and values.dtype == torch.bfloat16
            and mask.dtype == torch.bool and q.shape[2] <= MAX_QUERIES and q.shape[-1] % 16 == 0
            and q.shape[-1] <= MAX_HEAD_DIM and q.shape[1] % keys.shape[1] == 0 and keys.stride(-1) == 1
            and values.stride(-1) == 1 and available())


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float,
              gqa: bool) -> torch.Tensor:
    """softmax(scale * q K^T, where mask) V: q (B, Hq, T, D), keys and values (B, Hkv, E, D), mask (B, 1, T, E) bool
    (True: visible); `gqa`: Hkv < Hq, head h reading key/value head h // (Hq / Hkv) (a Python bool: SDPA refuses a
    symbolic one under dynamic shapes). Returns (B, T, Hq * D) in the cache's dtype."""
    B, Hq, T, D = q.shape
    q = q.to(keys.dtype)
    if _native_fits(q, keys, values, mask):
        out = native.call(torch.ops.restora.attention_decode, _attention_decode, q, keys, values, mask, scale)
        return out.reshape(B, T, Hq * D)
    a = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=gqa)  # (B, Hq, T, D)
    return a.transpose(1, 2).reshape(B, T, Hq * D)
