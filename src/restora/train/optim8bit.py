"""AdamW with 8-bit blockwise-quantized moments (Dettmers et al. 2022, "8-bit Optimizers via
Block-wise Quantization", arXiv:2110.02861).

Adam keeps two fp32 moments per parameter (8 bytes). Here each moment is stored as one
uint8 code per element plus one fp32 absmax per block of 256 consecutive elements (flat over
the parameter), about 2 + 8/256 = 2.03 bytes per parameter. Each step:

    m, v   = dequant(m_codes, m_absmax), dequant(v_codes, v_absmax)     # fp32, transient
    m      = b1 m + (1 - b1) g                                           # torch's lerp
    v      = b2 v + (1 - b2) g^2
    p      = p (1 - lr wd)                                               # decoupled decay (AdamW)
    p      = p - lr/(1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    m_codes, m_absmax = quant(m);  v_codes, v_absmax = quant(v)

quant(x) per block: absmax = max|x|, code = index of the code value nearest to x / absmax.
The first moment uses the signed 8-bit dynamic map (Dettmers 2016: a sign, a dynamic
exponent marked by the first 1-bit, and a linear fraction). The second moment is never
negative, so it uses the unsigned dynamic map, which spends the sign bit on one more fraction
bit and so doubles the resolution on [0, 1]; this is the paper's and bitsandbytes' choice.
Both maps are built exactly as `bitsandbytes.functional.create_dynamic_map` builds them (in
particular, unlike `restora.quant.nf4.dynamic_map`, the signed map's minimum stays at
-0.99297 instead of being moved to -1), so our codes are comparable with bitsandbytes'.

Parameters with fewer than `min_8bit_size` (4096) elements keep fp32 moments, as
bitsandbytes does; for them the update is exactly torch.optim.AdamW's (same operations,
same order). The state holds only tensors, so it can be checkpointed to safetensors:

    step                  fp32 ()              number of steps taken
    m_codes, v_codes      uint8 (numel,)       flat codes (large parameters)
    m_absmax, v_absmax    fp32  (nblocks,)     per-block scale
    exp_avg, exp_avg_sq   fp32  p.shape        moments (small parameters)
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from typing import Any

import torch

from restora.quant.nf4 import dequantize_blockwise, quantize_blockwise

__all__ = ["AdamW8bit", "optimizer_dynamic_map", "quantize_moment", "dequantize_moment"]

BLOCKSIZE = 256
MIN_8BIT_SIZE = 4096


@lru_cache(maxsize=None)
def optimizer_dynamic_map(signed: bool) -> tuple[float, ...]:
    """The 8-bit dynamic map, sorted, 256 values: in [-0.99297, 1] if signed, else [0, 1].

    For exponent e = 0..6, 2^e (signed, both signs) or 2^(e+1) (unsigned) fractions are the
    midpoints of evenly spaced boundaries in [0.1, 1], scaled by 10^(e - 6); 0 and 1 complete it.
    """
    values: list[float] = []
    for e in range(7):
        n_fractions = 2**e if signed else 2 ** (e + 1)
        bounds = torch.linspace(0.1, 1, n_fractions + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        values += ((10 ** (e - 6)) * means).tolist()
        if signed:
            values += (-(10 ** (e - 6)) * means).tolist()
    values += [0.0, 1.0]
    if len(values) != 256:
        raise AssertionError(f"optim8bit.py: dynamic map has {len(values)} values, expected 256")
    return tuple(sorted(values))


def _map(signed: bool, device: torch.device) -> torch.Tensor:
    return torch.tensor(optimizer_dynamic_map(signed), dtype=torch.float32, device=device)


def quantize_moment(x: torch.Tensor, signed: bool, blocksize: int = BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat blockwise 8-bit quantization: (uint8 codes (numel,), fp32 absmax (nblocks,))."""
    return quantize_blockwise(x, _map(signed, x.device), blocksize)


def dequantize_moment(codes: torch.Tensor, absmax: torch.Tensor, signed: bool, blocksize: int = BLOCKSIZE) -> torch.Tensor:
    """The fp32 moment, flat (numel,), from its codes and per-block absmax."""
    return dequantize_blockwise(codes, absmax, _map(signed, codes.device), blocksize)


class AdamW8bit(torch.optim.Optimizer):
    """AdamW whose moments are 8-bit blockwise quantized (fp32 for parameters < min_8bit_size)."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        min_8bit_size: int = MIN_8BIT_SIZE,
        blocksize: int = BLOCKSIZE,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"AdamW8bit: lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"AdamW8bit: betas must be in [0, 1), got {betas}")
        if not eps >= 0.0:
            raise ValueError(f"AdamW8bit: eps must be >= 0, got {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"AdamW8bit: weight_decay must be >= 0, got {weight_decay}")
        if min_8bit_size < 0:
            raise ValueError(f"AdamW8bit: min_8bit_size must be >= 0, got {min_8bit_size}")
        if blocksize < 1:
            raise ValueError(f"AdamW8bit: blocksize must be >= 1, got {blocksize}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.min_8bit_size = min_8bit_size
        self.blocksize = blocksize

    def is_8bit(self, p: torch.Tensor) -> bool:
        return p.numel() >= self.min_8bit_size

    def _init_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {"step": torch.zeros((), dtype=torch.float32)}
        if self.is_8bit(p):
            nblocks = -(-p.numel() // self.blocksize)
            for k in ("m", "v"):
                state[f"{k}_codes"] = torch.zeros(p.numel(), dtype=torch.uint8, device=p.device)
                state[f"{k}_absmax"] = torch.zeros(nblocks, dtype=torch.float32, device=p.device)
        else:
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2) = group["lr"], group["betas"]
            eps, wd = group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW8bit: sparse gradients are not supported")
                if torch.is_complex(p):
                    raise RuntimeError("AdamW8bit: complex parameters are not supported")
                state = self.state[p]
                if not state:
                    state.update(self._init_state(p))
                state["step"] += 1
                t = float(state["step"])
                grad = p.grad.float()
                quantized = "m_codes" in state
                if quantized:
                    m = dequantize_moment(state["m_codes"], state["m_absmax"], True, self.blocksize)  # (numel,)
                    v = dequantize_moment(state["v_codes"], state["v_absmax"], False, self.blocksize)
                    grad = grad.reshape(-1)  # (numel,) like the codes
                else:
                    m, v = state["exp_avg"], state["exp_avg_sq"]
                # fp32 working copy unless p already is one; contiguous so it can be viewed flat
                param = p if p.dtype == torch.float32 and p.is_contiguous() else p.float().contiguous()
                work = param.view(-1) if quantized else param  # (numel,) when quantized

                if wd != 0:
                    work.mul_(1 - lr * wd)
                m.lerp_(grad, 1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step_size = lr / (1 - beta1**t)
                bias_correction2_sqrt = (1 - beta2**t) ** 0.5
                denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
                work.addcdiv_(m, denom, value=-step_size)

                if param is not p:
                    p.copy_(param)
                if quantized:
                    for k, x, signed in (("m", m, True), ("v", v, False)):
                        codes, absmax = quantize_moment(x, signed, self.blocksize)
                        state[f"{k}_codes"].copy_(codes)
                        state[f"{k}_absmax"].copy_(absmax)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loader casts floating state to the parameter dtype (uint8 codes to float);
        restore every state tensor with its saved dtype instead."""
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved_ids, params):
            if i in state_dict["state"]:
                self.state[p] = {k: v.to(device=p.device).clone() for k, v in state_dict["state"][i].items()}

    def state_nbytes(self) -> int:
        """Bytes held by the optimizer state (codes, absmax, fp32 moments, step counters)."""
        return sum(v.numel() * v.element_size() for s in self.state.values() for v in s.values() if torch.is_tensor(v))
