"""Batched greedy decoding with a KV cache and stop strings.

Prompts are left-padded into one batch (B, T). The prompt pass fills the cache; each
further step feeds one token per row (B, 1) with explicit position ids, so padded rows
decode exactly as they would alone. A row finishes at EOS, at a stop string (the text
is cut before it), or after `max_new_tokens`; finished rows are dropped from the batch
(cache rows included) so late steps cost only what is still running.

With `speculate=k` (Llama-family models, lean forward), each step also verifies up to k
draft tokens from prompt lookup (restora.infer.lookup) in the same forward: the output is still
the greedy one, and rows that copy from their prompt take several tokens per step.

The base may be float or quantized in any restora format, with or without adapters:
decoding only calls the model. For a different adapter per row, pass `row_adapters`
and a `set_rows` callback (restora.adapters' batched forward provides one).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Sequence
from functools import cache, partial
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from restora.infer.decode import LeanDecoder, supports
from restora.infer.lookup import lookup_draft
from restora.kernels.compiled import room_for_variants
from restora.kernels.packed import can_pack, packed_linears
from restora.models.offload import is_offloaded

__all__ = ["greedy_generate", "greedy_tokens", "cache_kwargs", "cut_at_stop", "output_cache"]


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """`text` cut before its first stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """The index of each row's largest logit, the first on ties: argmax's answer. `max` gives it 2-4x faster
    on CPU for bf16 logits (SmolLM2's 49,152-token vocabulary, 8 rows: 138 against 622 us, measured)."""
    return logits.max(-1).indices


@cache
def _cache_keyword(model_type: type) -> str:
    """The keyword `model_type.forward` takes its KV cache by: `cache` (transformers >= 5.2x, where
    `past_key_values` is deprecated) or `past_key_values` (older releases); read once per class."""
    params = inspect.signature(model_type.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model: nn.Module, cache: Any) -> dict[str, Any]:
    """{keyword: cache} for a call of `model`'s forward, in the API of the installed transformers."""
    return {_cache_keyword(type(model)): cache}


def output_cache(out: Any) -> Any:
    """The KV cache a forward returned: `out.cache`, or `out.past_key_values` on older transformers."""
    found = getattr(out, "cache", None) if "cache" in getattr(type(out), "__dataclass_fields__", {}) else None
    return found if found is not None else out.past_key_values


def _select_cache(cache: Any, keep: torch.Tensor) -> Any:
    """Keep only rows `keep` of a transformers cache (DynamicCache or legacy tuples)."""
    if hasattr(cache, "batch_select_indices"):
        cache.batch_select_indices(keep)
        return cache
    if hasattr(cache, "layers"):
        for layer in cache.layers:
            layer.keys = layer.keys[keep]
            layer.values = layer.values[keep]
        return cache
    return tuple(tuple(t[keep] for t in layer) for layer in cache)


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 128,
    stop: Sequence[str] = (),
    batch_size: int = 8,
    bf16: bool = True,
    add_special_tokens: bool = True,
    row_adapters: Sequence[int] | None = None,
    set_rows: Callable[[nn.Module, torch.Tensor], None] | None = None,
    progress: bool = False,
    lean: bool = True,
    compile: bool = False,
    speculate: int = 0,
) -> list[str]:
    """Greedy completions of `prompts` (in order), each cut at its first stop string.

    `lean` decodes Llama-family models through restora.infer.decode's static-cache forward (others, or
    lean=False, through the model's own forward). With bf16 on a CPU that has it, float base
    layers run on pre-packed bf16 weights while decoding (restora.kernels.packed). `speculate` = k > 0
    verifies up to k prompt-lookup draft tokens per step (lean forward only).
    """
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if not 0 <= speculate <= LeanDecoder.STEP_TOKENS - 1:
        raise ValueError(f"speculate must be between 0 and {LeanDecoder.STEP_TOKENS - 1} draft tokens, got {speculate}")
    if row_adapters is not None and (set_rows is None or len(row_adapters) != len(prompts)):
        raise ValueError("row_adapters needs one entry per prompt and a set_rows callback")
    was_training = model.training
    model.eval()  # decoding never uses dropout; the caller's mode is restored at the end
    try:
        return _generate(model, tokenizer, prompts, max_new_tokens, stop, batch_size, bf16, add_special_tokens,
                         row_adapters, set_rows, progress, lean, compile, speculate)
    finally:
        model.train(was_training)


def _take(tokenizer: Any, tokens: list[int], new: Sequence[int], stop: Sequence[str], max_new_tokens: int) -> bool:
    """Append a row's new tokens in order until it finishes; True when it hit EOS, a stop string or the cap."""
    for t in new:
        if t == tokenizer.eos_token_id:
            return True
        tokens.append(t)
        if stop and cut_at_stop(tokenizer.decode(tokens[-16:]), stop)[1]:
            return True
        if len(tokens) >= max_new_tokens:
            return True
    return False


def _finished(
    tokenizer: Any, next_tok: torch.Tensor, alive: list[int], out_tokens: list[list[int]], stop: Sequence[str],
    max_new_tokens: int,
) -> torch.Tensor:
    """Append each alive row's new token; (len(alive),) bool: the row hit EOS, a stop string or the token cap."""
    return torch.tensor([_take(tokenizer, out_tokens[r], [int(next_tok[j])], stop, max_new_tokens)
                         for j, r in enumerate(alive)], dtype=torch.bool)


def _generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    stop: Sequence[str],
    batch_size: int,
    bf16: bool,
    add_special_tokens: bool,
    row_adapters: Sequence[int] | None,
    set_rows: Callable[[nn.Module, torch.Tensor], None] | None,
    progress: bool,
    lean: bool,
    compile: bool,
    speculate: int,
) -> list[str]:
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    encoded = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))  # similar lengths together
    results: list[str] = [""] * len(prompts)
    use_bf16 = bf16 and device.type == "cpu"
    lean = lean and supports(model) and not is_offloaded(model)  # the lean forward skips the blocks' paging hooks
    if speculate and not lean:
        warnings.warn(f"speculate={speculate} needs the lean forward of a Llama-family model; decoding without drafts",
                      stacklevel=3)
        speculate = 0
    room = max_new_tokens + speculate  # cache positions past the prompt: drafts of the last step included
    steps = partial(_LeanSteps, compile=compile) if lean else _ModelSteps
    # compiled steps reach the packed copies through restora::packed_linear; an offloaded model keeps its weights in
    # their file, which a packed copy would undo
    pack = use_bf16 and can_pack(device) and not is_offloaded(model)
    with packed_linears(model, min(batch_size, len(prompts)), enabled=pack), room_for_variants(compile and lean):
        for a in tqdm(range(0, len(order), batch_size), desc="generate", disable=not progress, leave=False):
            rows = order[a : a + batch_size]
            T = max(len(encoded[i]) for i in rows)
            ids = torch.full((len(rows), T), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), T), dtype=torch.long)
            for j, i in enumerate(rows):  # left padding
                ids[j, T - len(encoded[i]) :] = torch.tensor(encoded[i])
                mask[j, T - len(encoded[i]) :] = 1
            ids, mask = ids.to(device), mask.to(device)

            def adapters_of(alive: list[int], rows: list[int] = rows) -> None:
                if row_adapters is not None and set_rows is not None:
                    set_rows(model, torch.tensor([row_adapters[rows[r]] for r in alive], device=device))

            adapters_of(list(range(len(rows))))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
                if speculate:
                    out_tokens = _speculative_rows(steps(model, ids, mask, room), [encoded[i] for i in rows], tokenizer,
                                                   max_new_tokens, stop, adapters_of, speculate)
                else:
                    out_tokens = _greedy_rows(steps(model, ids, mask, room), tokenizer, max_new_tokens, stop,
                                              adapters_of)
            for j, i in enumerate(rows):
                results[i] = cut_at_stop(tokenizer.decode(out_tokens[j], skip_special_tokens=True), stop)[0]
    return results


class _ModelSteps:
    """Decoding through the model's own forward and transformers' KV cache (any causal LM)."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int) -> None:
        self.model, self.mask = model, mask
        self.positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T) position of each real token
        res = model(input_ids=ids, attention_mask=mask, position_ids=self.positions, use_cache=True, logits_to_keep=1)
        self.cache, self.logits = output_cache(res), res.logits[:, -1]  # (B, V) after the prompt

    def keep(self, keep: torch.Tensor) -> None:
        self.mask = self.mask[keep]
        self.cache = _select_cache(self.cache, keep)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,) at `positions` (B,); the next logits (B, V)."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(tokens), 1)], dim=1)
        res = self.model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=positions[:, None],
                         use_cache=True, **cache_kwargs(self.model, self.cache))
        self.cache = output_cache(res)
        return res.logits[:, -1]


class _LeanSteps:
    """Decoding through restora.infer.decode's static-cache forward (Llama-family models)."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int,
                 compile: bool = False) -> None:
        self.dec = LeanDecoder(model, ids.shape[0], ids.shape[1] + max_new_tokens, compile)
        self.positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T) position of each real token
        self.logits = self.dec.forward(ids, self.positions, mask.bool())  # (B, V) after the prompt

    def keep(self, keep: torch.Tensor) -> None:
        self.dec.keep_rows(keep)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        real = torch.ones((len(tokens), 1), dtype=torch.bool, device=tokens.device)
        return self.dec.forward(tokens[:, None], positions[:, None], real)

    def verify(self, tokens: torch.Tensor, positions: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Feed tokens (B, W) at positions (B, W), `real` marking fed slots; the logits of every slot (B, W, V)."""
        return self.dec.forward(tokens, positions, real, all_logits=True)

    def reject(self, kept: torch.Tensor) -> None:
        self.dec.reject(kept)


def _drop_finished(done: torch.Tensor, alive: list[int], last_pos: torch.Tensor, steps: _ModelSteps | _LeanSteps,
                   adapters_of: Callable[[list[int]], None], rows: Any) -> tuple[list[int], torch.Tensor, Any]:
    """Finished rows leave the batch: `alive` (batch row -> prompt row), `last_pos`, the decoder's cache, the
    per-row adapters and `rows` (a tensor or a list indexed by batch row) keep the others, in order."""
    keep = (~done).nonzero().flatten().to(last_pos.device)
    idx = keep.tolist()
    steps.keep(keep)
    alive = [alive[j] for j in idx]
    adapters_of(alive)  # per-row adapters follow their rows
    rows = rows[keep.to(rows.device)] if isinstance(rows, torch.Tensor) else [rows[j] for j in idx]
    return alive, last_pos[keep], rows


def _greedy_rows(
    steps: _ModelSteps | _LeanSteps, tokenizer: Any, max_new_tokens: int, stop: Sequence[str],
    adapters_of: Callable[[list[int]], None],
) -> list[list[int]]:
    """Greedy tokens of each row after the prompt pass in `steps`; finished rows leave the batch."""
    next_tok = greedy_tokens(steps.logits)  # (B,)
    last_pos = steps.positions[:, -1]
    alive = list(range(len(next_tok)))  # batch row -> prompt row
    out_tokens: list[list[int]] = [[] for _ in alive]
    for _ in range(max_new_tokens):
        done = _finished(tokenizer, next_tok, alive, out_tokens, stop, max_new_tokens)
        if done.all():
            break
        if done.any():
            alive, last_pos, next_tok = _drop_finished(done, alive, last_pos, steps, adapters_of, next_tok)
        last_pos = last_pos + 1
        next_tok = greedy_tokens(steps.step(next_tok, last_pos))
    return out_tokens


def _speculative_rows(
    steps: _LeanSteps, prompts: list[list[int]], tokenizer: Any, max_new_tokens: int, stop: Sequence[str],
    adapters_of: Callable[[list[int]], None], k: int,
) -> list[list[int]]:
    """As _greedy_rows, verifying up to k prompt-lookup drafts per row in each step (restora.infer.lookup)."""
    decided = [[int(t)] for t in greedy_tokens(steps.logits)]  # per batch row: tokens chosen, not yet taken
    last_pos = steps.positions[:, -1]  # (B,) position of each row's last token in the cache
    alive = list(range(len(decided)))  # batch row -> prompt row
    out_tokens: list[list[int]] = [[] for _ in alive]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    while True:
        done = torch.tensor([_take(tokenizer, out_tokens[r], decided[j], stop, max_new_tokens)
                             for j, r in enumerate(alive)], dtype=torch.bool)
        if done.all():
            break
        if done.any():
            alive, last_pos, decided = _drop_finished(done, alive, last_pos, steps, adapters_of, decided)
        # the last chosen token (not yet in the cache), then drafts no longer than the row's remaining budget
        drafts = [lookup_draft(prompts[r] + out_tokens[r], min(k, max_new_tokens - len(out_tokens[r]) - 1))
                  for r in alive]
        width = 1 + max(len(d) for d in drafts)
        feed = torch.full((len(alive), width), pad, dtype=torch.long)
        real = torch.zeros((len(alive), width), dtype=torch.bool)
        for j, d in enumerate(drafts):
            feed[j, : 1 + len(d)] = torch.tensor([decided[j][-1], *d])
            real[j, : 1 + len(d)] = True
        positions = last_pos[:, None] + 1 + torch.arange(width, device=last_pos.device)  # (B, W)
        pred = greedy_tokens(steps.verify(feed.to(last_pos.device), positions, real.to(last_pos.device))).tolist()  # (B, W)
        kept = []
        for j, d in enumerate(drafts):
            a = 0
            while a < len(d) and d[a] == pred[j][a]:  # draft i+1 is kept while it is the model's choice after i
                a += 1
            decided[j] = [*d[:a], pred[j][a]]
            kept.append(1 + a)  # the fed token and its a accepted drafts stay in the cache
        kept_t = torch.tensor(kept, device=last_pos.device)
        steps.reject(kept_t)
        last_pos = last_pos + kept_t
    return out_tokens
