"""A lean decoder forward for Llama-family models: static KV cache, no per-step bookkeeping.

transformers' generic forward spends, per layer and per generated token, more time on
cache objects, mask construction and dispatch than a 135M model spends on its matmuls
(about 0.4 ms per layer on this repo's CPU). `LeanDecoder` runs the same computation
directly on the model's own modules, so quantized layers, adapters and per-row adapters
work unchanged (the modules are called, never opened):

    h = embed(ids)                                                   (B, T, H)
    per block:  x = rmsnorm(h);  q, k, v = q_proj(x), k_proj(x), v_proj(x)
                q, k <- RoPE(q, k; positions)      (cos, sin from the model's rotary module)
                K[:, :, s:s+T], V[:, :, s:s+T] = k, v              (B, Hkv, T_max, D)
                h += o_proj(attend(q, K[:, :, :s+T], V[:, :, :s+T], mask))  grouped-query heads
                x = rmsnorm(h);  h += down(act(gate(x)) * up(x))
    logits = lm_head(rmsnorm(h[:, -1]))

`attend` is restora.kernels.attention_decode: a native kernel for inputs of up to 16 tokens a row
with a bf16 cache on CPUs with AVX-512 BF16, torch's SDPA otherwise. The mask lets a query
see every earlier non-padding key and always itself (a left-padding query then attends to
itself instead of to nothing, which would be NaN). Rows are left
padded and carry explicit positions, so each row decodes exactly as it would alone.

A step may feed several tokens per row (speculative decoding verifies drafts this way,
restora.infer.lookup): `forward(..., all_logits=True)` returns every fed position's logits, and
`reject(kept)` marks the slots after each row's first `kept` fed tokens as holes, which the
mask hides like padding. When holes fill the cache, `compact` moves each row's real keys
together (they carry their RoPE positions, so moving them changes nothing).

With `compile=True` every forward, prompt passes included, runs all blocks as one
torch.compile'd graph with dynamic shapes: one compile serves every cache length and batch
size, with variants for one token a row, up to 16 (drafts verified), longer prompts, and
batch 1. It trims the remaining per-op overhead (SmolLM2-135M, 4-bit base, batch 1, one
thread: 43 against 35 tokens/s) after a one-time compile of about a minute per variant.
Compiled prompt passes: 137-139 against 199-215 ms for 8 prompts of 80 tokens (RTN4, 2
threads), one compile more than eager prompt passes need. The compiled
step skips dynamo's per-step guards on the model's modules; instead each model structure
(`_structure`, digested once per decoder) gets its own compiled function (`_compiled_step`):
RTN4 batch 1 on a 2-core AMD EPYC, 88-91 -> 113 tokens/s.

Supported: model types in `LEAN_MODEL_TYPES` with plain RMSNorm and no sliding window;
`supports(model)` says whether a model qualifies (restora.infer.generate falls back to
transformers' forward otherwise).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from restora.kernels.attention_decode import attention
from restora.quant.base import QuantizedWeight

__all__ = ["LEAN_MODEL_TYPES", "LeanDecoder", "supports"]

LEAN_MODEL_TYPES = ("llama", "mistral", "qwen2")
_BLOCK_PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")


def supports(model: nn.Module) -> bool:
    """Whether `LeanDecoder` reproduces this model's forward (Llama-family layout, plain RMSNorm, full attention)."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in LEAN_MODEL_TYPES:
        return False
    if getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True):
        return False
    inner = getattr(model, "model", None)
    if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return False
    if model.get_output_embeddings() is None:
        return False
    for block in inner.layers:
        for part in _BLOCK_PARTS:
            try:
                block.get_submodule(part)
            except AttributeError:
                return False
        for norm in (block.input_layernorm, block.post_attention_layernorm):
            if type(norm).__name__ not in ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"):
                return False
    return type(inner.norm).__name__ in ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")


def _rms_norm(norm: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """HF's RMSNorm: normalise in fp32, cast back to the input dtype, scale by the weight."""
    x = F.rms_norm(h.float(), (h.shape[-1],), eps=norm.variance_epsilon)
    return norm.weight * x.to(h.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, T, D) rotated by cos/sin (B, 1, T, D): x·cos + rotate_half(x)·sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _block(
    block: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, keys: torch.Tensor,
    values: torch.Tensor, s: int, e: int, shape: tuple[int, int, int], gqa: bool, scaling: float, act: Callable,
) -> torch.Tensor:
    """One decoder block on h (B, T, H) for cache positions [s, e); writes its keys/values into the cache."""
    heads, kv_heads, head_dim = shape
    B, T, _ = h.shape
    attn, mlp = block.self_attn, block.mlp
    x = _rms_norm(block.input_layernorm, h)
    q = attn.q_proj(x).view(B, T, heads, head_dim).transpose(1, 2)  # (B, Hq, T, D)
    k = attn.k_proj(x).view(B, T, kv_heads, head_dim).transpose(1, 2)  # (B, Hkv, T, D)
    v = attn.v_proj(x).view(B, T, kv_heads, head_dim).transpose(1, 2)
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    keys[:, :, s:e] = k
    values[:, :, s:e] = v
    a = attention(q, keys[:, :, :e], values[:, :, :e], mask, scaling, gqa)  # (B, T, Hq * D)
    h = h + attn.o_proj(a)
    x = _rms_norm(block.post_attention_layernorm, h)
    return h + mlp.down_proj(act(mlp.gate_proj(x)) * mlp.up_proj(x))


def _describe(v: Any, memo: dict[int, Any]) -> Any:
    """What a compiled step could depend on in one module attribute: a tensor's kind and layout, a plain value
    itself, containers element by element, configs by their settings, anything else (functions, hooks) by
    identity. `memo`: configs already described in this digest (every attention module holds the model's)."""
    if isinstance(v, torch.Tensor):
        return ("tensor", v.dtype, v.device.type, tuple(v.shape), v.stride(), v.requires_grad)
    if v is None or isinstance(v, (bool, int, float, str, torch.dtype, torch.device)):
        return v
    if isinstance(v, (list, tuple)):
        return (type(v).__name__, tuple(_describe(x, memo) for x in v))
    if isinstance(v, (set, frozenset)):
        return ("set", tuple(sorted(repr(_describe(x, memo)) for x in v)))
    if isinstance(v, dict):
        return ("dict", tuple((k, _describe(x, memo)) for k, x in v.items()))
    if isinstance(v, nn.Module):  # a child (or a module held as an attribute): its own entry describes it
        return ("module", type(v).__qualname__)
    if id(v) in memo:
        return memo[id(v)]
    if dataclasses.is_dataclass(v) and not isinstance(v, type):  # e.g. an adapter's config: by its settings
        d = (type(v).__qualname__, tuple((f.name, _describe(getattr(v, f.name), memo)) for f in dataclasses.fields(v)))
    elif callable(getattr(v, "to_json_string", None)):  # transformers' configs: the same settings, the same graph
        d = (type(v).__qualname__, v.to_json_string(use_diff=False))
    else:
        d = (type(v).__qualname__, id(v))
    memo[id(v)] = d
    return d


def _structure(model: nn.Module) -> tuple:
    """A digest of everything but tensor values that a compiled decoding step's graph was built for: every
    module's type and attributes (_describe), its parameters' and buffers' layouts. Two models with the same
    digest run the same graph correctly, since the graph reads the tensors themselves at every call. The digest is
    the descriptions themselves, compared whole, so no hash collision can share a graph (SmolLM2-135M, 4-bit:
    ~19 ms)."""
    memo: dict[int, Any] = {}
    parts = []
    for name, m in model.named_modules():
        attrs = tuple((k, _describe(v, memo)) for k, v in sorted(vars(m).items()) if k not in ("_parameters", "_buffers"))
        parts.append((name, type(m).__module__, type(m).__qualname__, attrs, _describe(dict(m._parameters), memo),
                      _describe(dict(m._buffers), memo)))
    return tuple(parts)


# One compiled step function per model structure (_structure): each has its own code object, hence its own
# dynamo cache, whose graphs skip dynamo's guards on the model's modules. Those guards re-checked ~1,500
# tensors and ~3,000 module attributes at every step (SmolLM2-135M, RTN4: 2.6 ms of a 10-19 ms step on a
# 2-core AMD EPYC); the digest checks the same things once per decoder. Models whose modules keep Python
# state a graph bakes in and that changes between steps (NEEDS_GUARDS, e.g. per-row adapter batches) keep
# the guards. The STEPS_KEPT most recently used are kept (a long-lived process decoding many structures would
# otherwise keep every graph); an evicted structure compiles again if it comes back.
STEPS_KEPT = 8
_STEPS: collections.OrderedDict[tuple, Callable] = collections.OrderedDict()
_compiled_steps = itertools.count()


def _compiled_step(decoder: "LeanDecoder", model: nn.Module) -> Callable:
    if any(getattr(type(m), "NEEDS_GUARDS", False) for m in model.modules()):
        return torch.compile(decoder._blocks, dynamic=True)
    key = _structure(model)
    fn = _STEPS.get(key)
    if fn is None:
        name = f"_blocks_{next(_compiled_steps)}"
        fn = types.FunctionType(LeanDecoder._blocks.__code__.replace(co_name=name), LeanDecoder._blocks.__globals__, name)
        fn = _STEPS[key] = torch.compile(fn, dynamic=True,
                                         options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
        while len(_STEPS) > STEPS_KEPT:
            _STEPS.popitem(last=False)  # the least recently used
    _STEPS.move_to_end(key)
    return functools.partial(fn, decoder)


def _cache(t: torch.Tensor) -> torch.Tensor:
    """A (B, Hkv, positions, D) cache tensor with its fixed dims marked static: a compiled step's guards then
    check them in C++ instead of as symbolic size relations between the blocks' caches."""
    for d in (1, 3):
        torch._dynamo.mark_static(t, d)
    return t


class LeanDecoder:
    """A static-cache forward over a Llama-family causal LM, for `batch` rows of up to `max_len` tokens."""

    STEP_TOKENS = 16  # the most tokens a row a decoding step feeds (restora.infer.lookup's drafts + 1)

    def __init__(self, model: nn.Module, batch: int, max_len: int, compile: bool = False) -> None:
        if not supports(model):
            raise ValueError(f"{type(model).__name__}: not a Llama-family decoder the lean forward supports")
        cfg = model.config
        inner: Any = model.model
        self.inner, self.head = inner, model.get_output_embeddings()
        self.blocks = list(inner.layers)
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.act = ACT2FN[cfg.hidden_act]
        self.shape = (self.heads, self.kv_heads, self.head_dim)
        self.gqa = self.kv_heads != self.heads  # a bool: under dynamic shapes ints would turn symbolic
        # every forward's blocks, with compile=True
        if compile:  # quantized layers' kernel layouts now: a graph only uses layouts that exist when it is traced
            for module in model.modules():
                if isinstance(module, QuantizedWeight):
                    module.prepare_fast()
        self.step: Callable | None = _compiled_step(self, model) if compile else None
        self.scaling = [getattr(b.self_attn, "scaling", self.head_dim**-0.5) for b in self.blocks]
        device = next(model.parameters()).device
        self.capacity = max_len
        # (B, Hkv, max_len, D) per block, allocated at the first forward in the dtype keys come out in
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.valid = torch.zeros((batch, max_len), dtype=torch.bool, device=device)  # key positions that are real
        self.length = 0  # cache positions filled so far (same for every row: rows are left padded)
        self._last = (0, 0)  # cache positions [s, e) the last forward wrote (what reject() trims)

    def keep_rows(self, keep: torch.Tensor) -> None:
        """Drop finished rows: keep only batch rows `keep` of the cache (a copy of the filled part)."""
        n = self.length
        for store in (self.keys, self.values):
            for i, t in enumerate(store):
                fresh = t.new_zeros((len(keep), *t.shape[1:]))
                fresh[:, :, :n] = t[keep, :, :n]
                store[i] = _cache(fresh)
        self.valid = self.valid[keep]

    def reject(self, kept: torch.Tensor) -> None:
        """After a multi-token forward: row b keeps its first kept[b] fed tokens; later slots become holes."""
        s, e = self._last
        slot = torch.arange(s, e, device=self.valid.device)  # (T,)
        self.valid[:, s:e] &= slot[None] < s + kept[:, None]

    def compact(self) -> None:
        """Move each row's real cache slots, in order, to the right end of [0, n), n = the most any row has."""
        v = self.valid[:, : self.length]  # (B, L)
        counts = v.sum(-1)  # (B,)
        n = int(counts.max()) if counts.numel() else 0
        rank = v.long().cumsum(-1) - 1  # (B, L): index of each real slot among its row's real slots
        b_idx, src = v.nonzero(as_tuple=True)  # (R,), (R,)
        dst = rank[b_idx, src] + (n - counts)[b_idx]  # (R,): right-aligned, left padding
        for store in (self.keys, self.values):
            for i, t in enumerate(store):
                moved = torch.zeros_like(t)
                moved[b_idx, :, dst] = t[b_idx, :, src]  # (R, Hkv, D) slots
                store[i] = _cache(moved)
        valid = torch.zeros_like(self.valid)
        valid[b_idx, dst] = True
        self.valid, self.length = valid, n

    def _blocks(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, s: int,
                e: int) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            h = _block(block, h, cos, sin, mask, self.keys[i], self.values[i], s, e, self.shape, self.gqa, self.scaling[i],
                       self.act)
        return h

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, real: torch.Tensor,
                all_logits: bool = False) -> torch.Tensor:
        """Append tokens ids (B, T) at `positions` (B, T); `real` (B, T) marks non-padding.
        Returns the last position's logits (B, V), or every position's (B, T, V) with `all_logits`."""
        B, T = ids.shape
        if self.length + T > self.capacity and self.keys:
            self.compact()  # holes left by rejected drafts
        s, e = self.length, self.length + T
        if e > self.capacity:
            raise ValueError(f"the lean decoder's cache holds {self.capacity} positions, asked for {e}")
        self.valid[:, s:e] = real
        self.length, self._last = e, (s, e)
        # mask (B, 1, T, e): key j is visible to query i when it is real and not in the future; always to itself
        causal = torch.ones((T, e), dtype=torch.bool, device=ids.device).tril(diagonal=s)
        mask = (self.valid[:, None, :e] & causal)[:, None]
        mask[:, 0, :, s:e] |= torch.eye(T, dtype=torch.bool, device=ids.device)
        h = self.inner.embed_tokens(ids)  # (B, T, H)
        cos, sin = self.inner.rotary_emb(h, positions)  # (B, T, D) each
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D): broadcast over heads
        if not self.keys:  # first forward: the cache takes the dtype attention will compute in
            dev = h.device.type
            dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
            shape = (B, self.kv_heads, self.capacity, self.head_dim)
            self.keys = [_cache(h.new_zeros(shape, dtype=dtype)) for _ in self.blocks]
            self.values = [_cache(h.new_zeros(shape, dtype=dtype)) for _ in self.blocks]
        run = self.step if self.step is not None else self._blocks
        h = run(h, cos, sin, mask, s, e)
        return self.head(_rms_norm(self.inner.norm, h if all_logits else h[:, -1]))  # (B, T, V) or (B, V)
