"""Cross-entropy through a frozen LM head, its input gradient computed in the forward pass.

The completion loss projects the N label positions' hidden states h (N, H) to the
vocabulary with the head W (V, H) and sums the cross-entropy. With the head frozen (LoRA
never trains it), the only gradient the backward needs is the one for h:

    logits = h W^T                                   (N, V), chunk by chunk
    loss   = sum_i  logsumexp(logits_i) - logits_i[y_i]
    dL/dh  = (softmax(logits) - onehot(y)) W          (N, H)

so each chunk's dL/dh is computed right after its loss, and only dL/dh (N x H, tiny) is
kept for the backward. This is the fused linear cross-entropy of Liger Kernel (Hsu et al.
2024, "Liger Kernel: Efficient Triton Kernels for LLM Training"). Against keeping nothing
and recomputing a chunk's logits in the backward (activation checkpointing), it saves one
(N x H x V) matmul per step and never holds more than one chunk's (chunk, V) logits.

The arithmetic is the one autograd would do for `F.cross_entropy(head(h).float(), y)`
under bf16 autocast: logits in the compute dtype, softmax in fp32, the gradient cast back
to the compute dtype for the matmul with W. The element-wise part (log-sum-exp, softmax,
minus one-hot, cast) runs over (chunk, V) values, 15M for 300 SmolLM2 label positions; done
op by op it makes seven passes over them (~100 ms per step on this repo's CPU), so chunks
that large go through one torch.compile'd function that fuses it into two or three. `frozen_head_ce` applies to a plain
`nn.Linear` head whose parameters need no gradient; restora.train.loop falls back to the
checkpointed chunks otherwise.

A float head under a lower-precision autocast (a quantized base keeps its embeddings and
tied head in fp32) would be cast to the compute dtype by autocast at both of a chunk's
matmuls, every step: for SmolLM2's 49152 x 576 head that was 2 x 56 ms of a ~1 s step
(profile, 4-bit base, 2 threads). The head is frozen, so its cast is made once and kept
with the head (restora.kernels.derived: made again when the weight tensor or its version changes):
the same bf16 values autocast would make, held for the run instead of for each loss.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from restora.kernels.compiled import can_compile
from restora.kernels.derived import Derived

__all__ = ["frozen_head", "frozen_head_ce"]


def frozen_head(head: nn.Module) -> bool:
    """A plain linear head with nothing to train: the fused loss applies."""
    return type(head) is nn.Linear and not any(p.requires_grad for p in head.parameters())


COMPILE_MIN = 4_000_000  # (chunk x V) values from which the element-wise part is compiled (if a compiler exists)


def _ce_and_grad(logits: torch.Tensor, y: torch.Tensor, need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed CE of logits (c, V) against y (c,), -100 ignored; and d(loss)/d(logits) in the logits' dtype."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)  # (c,)
    counted = y != -100
    target = y.clamp(min=0)
    loss = ((lse - x.gather(1, target[:, None])[:, 0]) * counted).sum()
    if not need_grad:
        return loss, None
    p = torch.exp(x - lse[:, None])  # softmax, (c, V)
    hit = torch.arange(x.shape[1], device=x.device)[None] == target[:, None]  # one-hot, (c, V)
    g = torch.where(hit, p - 1.0, p) * counted[:, None]
    return loss, g.to(logits.dtype)  # as autograd casts the fp32 gradient back to the logits' dtype


_compiled: Any = None  # _ce_and_grad compiled, built on first use


def _ce_chunk(logits: torch.Tensor, y: torch.Tensor, need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """_ce_and_grad, compiled for chunks of at least COMPILE_MIN values where inductor can build. A compile
    that fails (e.g. no triton on a GPU) falls back to the same function uncompiled, with one warning."""
    global _compiled
    if logits.numel() < COMPILE_MIN:
        return _ce_and_grad(logits, y, need_grad)
    if _compiled is None:
        _compiled = torch.compile(_ce_and_grad, dynamic=True) if can_compile(logits.device) else _ce_and_grad
    try:
        return _compiled(logits, y, need_grad)
    except Exception as e:  # the compiled and eager functions are the same arithmetic: only speed is lost
        if _compiled is _ce_and_grad:
            raise
        warnings.warn(f"restora.kernels.head_loss: torch.compile of the loss failed ({type(e).__name__}: {e}); running it "
                      "uncompiled", stacklevel=2)
        _compiled = _ce_and_grad
        return _ce_and_grad(logits, y, need_grad)


_CASTS: Derived[torch.Tensor] = Derived()  # each float head's weight in the compute dtype


def _compute_weight(head: nn.Linear, device: torch.device) -> torch.Tensor:
    """The head's weight in the autocast dtype (cast once and kept), or as it is without autocast."""
    w = head.weight
    if not torch.is_autocast_enabled(device.type):
        return w
    dtype = torch.get_autocast_dtype(device.type)
    if w.dtype == dtype or not w.is_floating_point():
        return w
    return _CASTS.get(head, (w,), lambda: w.detach().to(dtype), extra=dtype)


class _FrozenHeadCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor,
                chunk: int) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        need_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(h) if need_grad else None  # (N, H)
        for a in range(0, h.shape[0], chunk):
            hc, yc = h[a : a + chunk], y[a : a + chunk]  # (c, H), (c,)
            logits = F.linear(hc, weight, bias)  # (c, V) in the compute dtype (autocast applies here)
            loss, g = _ce_chunk(logits, yc, need_grad)
            total = total + loss
            if g is not None:
                grad[a : a + chunk] = (g @ weight).to(h.dtype)  # (c, H); autocast casts W as it did for the logits
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None, None]:
        (grad,) = ctx.saved_tensors
        return (None if grad is None else grad * grad_out.to(grad.dtype)), None, None, None, None


def frozen_head_ce(head: nn.Linear, h: torch.Tensor, y: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Summed cross-entropy of head(h) (N, V) against y (N,), -100 ignored; its backward reaches h only."""
    return _FrozenHeadCE.apply(h, _compute_weight(head, h.device), head.bias, y, chunk)
