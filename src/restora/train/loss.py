"""The completion-only loss: of one batch (completion_loss) and the mean over a set of rows (evaluate_loss).

Logits are computed only where a label exists: the decoder's hidden states at label positions are gathered,
(N, H), and projected to the vocabulary in chunks, each chunk under activation checkpointing, so full-vocabulary
logits for the batch never exist at once and prompt positions never reach the LM head:
    loss = sum_i CE(lm_head(h_i), y_{i+1}) / (label tokens in the effective batch)
Where the model allows it the decoder runs padding-free (restora.kernels.unpadded): on real tokens only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from restora.kernels.attention import can_unpad, training_attention
from restora.kernels.head_loss import frozen_head, frozen_head_ce
from restora.kernels.unpadded import unpad, unpaddable_family
from restora.train.distributed import DistInfo, all_reduce_sum

__all__ = ["Example", "LOGIT_CHUNK", "LossFn", "completion_loss", "evaluate_loss", "row_losses"]

Example = dict[str, list[int]]  # {"input_ids": [...], "labels": [...]} with -100 on prompt positions
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, int]]  # (ids, labels, mask) -> (sum, n)
LOGIT_CHUNK = 1024  # label positions projected to the vocabulary at once


def _collate(rows: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows as right-padded (ids, labels, mask) tensors, (B, T) each."""
    T = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):  # right padding
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return ids, labels, mask


def _set_attention(model: nn.Module, impl: str) -> None:
    """Set the model's attention implementation, through transformers where it allows it, else on its config."""
    if hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation(impl)
            return
        except (ValueError, ImportError):
            pass
    model.config._attn_implementation = impl


@contextmanager
def _attention(model: nn.Module, impl: str | None) -> Iterator[None]:
    """Run with the model's attention implementation set to `impl` (None: as it is); restored after."""
    before = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl is not None:
        _set_attention(model, impl)
    try:
        yield
    finally:
        if impl is not None and before is not None:
            _set_attention(model, before)


def _backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    head = model.get_output_embeddings()
    backbone = getattr(model, model.base_model_prefix, None)
    if head is None or backbone is None:
        raise ValueError(f"{type(model).__name__}: cannot find the decoder and LM head for completion-only loss")
    return backbone, head


def _chunk_ce(head: nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = head(h).float()  # (n, V): one chunk only
    return F.cross_entropy(logits, y, reduction="sum")


def _label_states(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    """The decoder's hidden states at label positions and their targets, (N, H) and (N,), row-major."""
    backbone, head = _backbone_and_head(model)
    if can_unpad(model):  # padding-free: the projections see only real tokens (restora.kernels.unpadded)
        u = unpad(ids, labels, mask, backbone.get_input_embeddings().weight.dtype)
        hidden = backbone(input_ids=u.ids, position_ids=u.positions, use_cache=False, restora_rows=u.rows,
                          restora_mask=u.mask).last_hidden_state[0]  # (N_real, H)
        sel = u.targets != -100
        h, y = hidden[sel], u.targets[sel]  # (N, H), (N,) in the padded forward's (row-major) order
    else:
        hidden = backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state  # (B, T, H)
        target = labels[:, 1:]  # token t+1 is predicted at position t
        sel = target != -100  # (B, T-1)
        h = hidden[:, :-1][sel]  # (N, H)
        y = target[sel]  # (N,)
    return h, y, head


def completion_loss(
    model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """Summed CE over label positions (and their count), logits only at those positions."""
    h, y, head = _label_states(model, ids, labels, mask)
    extra = -h.shape[0] % 64  # ignored rows: the head's matmuls take fewer distinct (kernel-cached) shapes
    if extra:
        h, y = F.pad(h, (0, 0, 0, extra)), F.pad(y, (0, extra), value=-100)
    if frozen_head(head):  # the usual case: dL/dh computed with the loss, no logits kept or recomputed
        return frozen_head_ce(head, h, y, LOGIT_CHUNK), int(y.numel()) - extra
    total = h.new_zeros((), dtype=torch.float32)
    for a in range(0, h.shape[0], LOGIT_CHUNK):
        hc, yc = h[a : a + LOGIT_CHUNK], y[a : a + LOGIT_CHUNK]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_ce, head, hc, yc, use_reentrant=False)
        else:
            total = total + _chunk_ce(head, hc, yc)
    return total, int(y.numel()) - extra


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    rows: Sequence[Example],
    pad_id: int,
    micro_batch_size: int = 8,
    bf16: bool = True,
    dist_info: DistInfo | None = None,
    loss_of: LossFn | None = None,
) -> float:
    """Mean completion log loss (nats/token) over `rows` (split over ranks when distributed).

    `loss_of` replaces `completion_loss(model, ...)` (the FSDP root, under sharding).
    """
    info = dist_info or DistInfo()
    loss_of = loss_of or partial(completion_loss, model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with _attention(model, _scoring_attention(model, device)):
        total, count = _loss_over(rows, pad_id, micro_batch_size, bf16, info, loss_of, device)
    model.train(was_training)
    total, count = all_reduce_sum([total, float(count)], info)
    return total / max(count, 1)


def _scoring_attention(model: nn.Module, device: torch.device) -> str | None:
    """On CPU, score padding-free (restora.kernels.unpadded) as training does, so a later evaluation of an adapter
    repeats its training-time validation loss: the attention that allows it, where the model lacks it."""
    swap = device.type == "cpu" and not can_unpad(model) and unpaddable_family(model)
    return training_attention(model, recompute=False) if swap else None


def _shortest_first(rows: Sequence[Example], indices: Sequence[int], micro_batch_size: int) -> list[list[int]]:
    """`indices` of `rows` in micro-batches, shortest rows first (less padding)."""
    order = sorted(indices, key=lambda i: len(rows[i]["input_ids"]))
    return [order[a : a + micro_batch_size] for a in range(0, len(order), micro_batch_size)]


def _scored(rows: Sequence[Example], b: list[int], pad_id: int, device: torch.device, bf16: bool,
            score: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Any]) -> Any:
    """`score(ids, labels, mask)` on the micro-batch of rows `b`, under bf16 autocast if asked."""
    ids, labels, mask = (t.to(device) for t in _collate([rows[i] for i in b], pad_id))
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        return score(ids, labels, mask)


def _loss_over(rows: Sequence[Example], pad_id: int, micro_batch_size: int, bf16: bool, info: DistInfo,
               loss_of: LossFn, device: torch.device) -> tuple[float, int]:
    """Summed loss and label count over this rank's share of `rows`, shortest rows first (less padding)."""
    total, count = 0.0, 0
    batches: list[list[int] | None] = list(_shortest_first(rows, info.shard(range(len(rows))), micro_batch_size))
    if info.fsdp:  # every forward gathers parameters: all ranks run as many; a short rank repeats a row, unscored
        most = math.ceil(math.ceil(len(rows) / info.world_size) / micro_batch_size)
        batches += [None] * (most - len(batches))
    for b in batches:
        s, n = _scored(rows, b if b is not None else [0], pad_id, device, bf16, loss_of)
        if b is not None:
            total += float(s)
            count += n
    return total, count


@torch.no_grad()
def row_losses(
    model: nn.Module, rows: Sequence[Example], pad_id: int, micro_batch_size: int = 8, bf16: bool = True
) -> list[tuple[float, int]]:
    """Each row's summed completion loss (nats) and label count, in the order of `rows`.

    The per-row numbers a paired bootstrap over test rows needs: sum(s) / sum(n) is `evaluate_loss`'s mean.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device

    def per_row(ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        h, y, head = _label_states(model, ids, labels, mask)
        per_token = torch.cat([F.cross_entropy(head(h[c : c + LOGIT_CHUNK]).float(), y[c : c + LOGIT_CHUNK],
                                               reduction="none") for c in range(0, h.shape[0], LOGIT_CHUNK)])
        return per_token, (labels[:, 1:] != -100).sum(1).tolist()

    out: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    with _attention(model, _scoring_attention(model, device)):
        for b in _shortest_first(rows, range(len(rows)), micro_batch_size):
            per_token, counts = _scored(rows, b, pad_id, device, bf16, per_row)
            if sum(counts) != per_token.numel():
                raise RuntimeError(f"row_losses: {per_token.numel()} label positions, expected {sum(counts)}")
            for i, part, n in zip(b, per_token.split(counts), counts):
                out[i] = (float(part.sum()), int(n))
    model.train(was_training)
    return out
