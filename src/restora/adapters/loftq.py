"""LoftQ: LoRA-fine-tuning-aware quantization (Li et al. 2023, arXiv:2310.08659).

QLoRA starts fine-tuning from Q(W) + 0, which at 2 bits is far from W. LoftQ instead
chooses the quantized base and the LoRA initialisation together, so that their sum is
close to W. With A = B = 0 (PEFT's convention: ΔW = s · B A, A: (r, in), B: (out, r),
s = alpha / r, or alpha / sqrt(r) for rsLoRA) it alternates, for t = 1..T:

    Q_t      = quantize(W - s · B_{t-1} A_{t-1})          any restora quantizer
    R_t      = W - dequant(Q_t)                           (out, in)
    U S Vᵀ   = rank-r SVD of R_t
    B_t      = U √S / √s,   A_t = √S Vᵀ / √s               so that s · B_t A_t = U S Vᵀ

and reports  errors[t-1] = ‖W - (dequant(Q_t) + s · B_t A_t)‖_F  for t = 1..T. Note that
errors[0] already includes the first low-rank correction; the QLoRA starting error
‖W - dequant(Q(W))‖_F = ‖R_1‖_F is reported separately as `quant_error`.

What we return: the iterate with the smallest error (PEFT returns the last). The two agree
whenever the errors do not increase; they can increase slightly because RTN and NF4 pick
their grid (min/max or absmax) from the target rather than to minimise the error.

Quantizers: nf4/fp4 (4 bits), int8, and uniform RTN at 2/3/4/8 bits, all through
`restora.quant.linear.quantize_weight`. LoftQ has no calibration data, so a `gptq` spec is
quantized by RTN on the same grid (same bits and group size) and the weight says "rtn".

Mixed precision (the paper's 2/4-bit setting): `LoftQConfig(bits=2, first_layers=4,
first_layers_bits=4)` quantizes decoder blocks 0..3 at 4 bits and the rest at 2. PEFT's
LoftQ supports only 4 and 8 bits; here any (format, bits) pair restora supports works.

SVD: the residual is (out, in) with rank r << min(out, in). On a 576×1536 SmolLM2 MLP
matrix (1 CPU thread) torch.linalg.svd takes ~130 ms and a rank-16 randomized SVD (2r
columns, 4 power iterations) ~7 ms, as long as the quantization itself (~70-120 ms),
while its rank-r error is within 0.1% of the exact one. So "randomized" is the default; it
uses its own seeded generator (deterministic, and the global RNG is left alone).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from restora.quant.base import QuantizedWeight
from restora.quant.linear import QuantLinear, linear_shape, quantize_weight, weight_of
from restora.quant.model import quantizable_layers
from restora.core.modules import decoder_blocks, set_module
from restora.quant.spec import QuantSpec

__all__ = ["LoftQConfig", "LoftQResult", "loftq_init", "loftq_init_model", "low_rank_svd", "lora_scaling"]

log = logging.getLogger(__name__)

SVD_METHODS = ("exact", "randomized")


@dataclass(frozen=True)
class LoftQConfig:
    """How LoftQ quantizes each layer.

    bits, format: the base precision of every layer not in the first `first_layers`
        decoder blocks (format: rtn, nf4, fp4, int8 or gptq, which LoftQ runs as rtn).
    group_size: inputs sharing one scale (see QuantSpec).
    first_layers: how many leading decoder blocks get `first_layers_bits` instead (0: none).
    first_layers_bits, first_layers_format: their precision; the format defaults to `format`.
    double_quant: nf4/fp4 only, 8-bit absmax constants.
    iters: alternating steps T (the paper uses 1 to 5).
    svd: "randomized" (default, fast) or "exact" (torch.linalg.svd).
    """

    bits: int = 2
    format: str = "rtn"
    group_size: int = 64
    first_layers: int = 0
    first_layers_bits: int = 4
    first_layers_format: str | None = None
    double_quant: bool = False
    iters: int = 5
    svd: str = "randomized"

    def __post_init__(self) -> None:
        if self.iters < 1:
            raise ValueError(f"LoftQConfig.iters must be >= 1, got {self.iters}")
        if self.first_layers < 0:
            raise ValueError(f"LoftQConfig.first_layers must be >= 0, got {self.first_layers}")
        if self.svd not in SVD_METHODS:
            raise ValueError(f"LoftQConfig.svd must be one of {SVD_METHODS}, got {self.svd!r}")
        checks = [("bits/format", self.bits, self.format)]
        if self.first_layers:
            checks.append(("first_layers_bits/first_layers_format", self.first_layers_bits, self._first_format))
        for name, bits, fmt in checks:
            if self._spec(bits, fmt).is_float:
                raise ValueError(f"LoftQConfig.{name}: LoftQ needs a quantized format, not 'float'")

    @property
    def _first_format(self) -> str:
        return self.first_layers_format or self.format

    def _spec(self, bits: int, fmt: str) -> QuantSpec:
        try:
            return QuantSpec(format=fmt, bits=bits, group_size=self.group_size, double_quant=self.double_quant)
        except ValueError as e:
            raise ValueError(f"LoftQConfig: {e}") from None

    def spec_for_layer(self, layer_index: int | None, n_layers: int) -> QuantSpec:
        """The QuantSpec of decoder block `layer_index` of `n_layers` (None: outside the blocks)."""
        if layer_index is not None and not 0 <= layer_index < n_layers:
            raise ValueError(f"layer index {layer_index} is outside 0..{n_layers - 1}")
        if layer_index is not None and layer_index < self.first_layers:
            return self._spec(self.first_layers_bits, self._first_format)
        return self._spec(self.bits, self.format)

    def bits_for_layer(self, layer_index: int | None, n_layers: int) -> int:
        return self.spec_for_layer(layer_index, n_layers).bits


@dataclass
class LoftQResult:
    """A LoftQ initialisation of one (out, in) weight W.

    qweight: the quantized base Q; lora_A: (r, in); lora_B: (out, r); with
    W ≈ dequant(Q) + scaling · lora_B @ lora_A.
    errors[t]: ‖W - (dequant(Q_{t+1}) + scaling · B_{t+1} A_{t+1})‖_F after step t+1.
    quant_error: ‖W - dequant(Q(W))‖_F, the QLoRA starting point (no adapter).
    best_iter: index into `errors` of the returned iterate (the smallest error).
    """

    qweight: QuantizedWeight
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    errors: list[float]
    quant_error: float
    weight_norm: float
    best_iter: int
    scaling: float
    spec: QuantSpec
    layer_index: int | None = field(default=None)

    @property
    def error(self) -> float:
        """The error of the returned iterate."""
        return self.errors[self.best_iter]

    def reconstruct(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """dequant(Q) + scaling · B A as an (out, in) tensor."""
        return (self.qweight.dequantize(torch.float32) + self.scaling * (self.lora_B @ self.lora_A)).to(dtype)


def lora_scaling(rank: int, alpha: float, use_rslora: bool = False) -> float:
    """LoRA's s = alpha / r, or rsLoRA's alpha / sqrt(r)."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    return alpha / (math.sqrt(rank) if use_rslora else rank)


def low_rank_svd(
    matrix: torch.Tensor, rank: int, method: str = "randomized", power_iters: int = 4, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` singular triplets U (m, r), S (r,), Vh (r, n) of a float matrix (m, n).

    "randomized" is Halko et al. (2011) with 2r columns and `power_iters` subspace
    iterations, from a private seeded generator; it falls back to the exact SVD when
    2r is not small against min(m, n).
    """
    m, n = matrix.shape
    cols = 2 * rank
    if method == "exact" or 2 * cols >= min(m, n):
        U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
        return U[:, :rank], S[:rank], Vh[:rank]
    if method != "randomized":
        raise ValueError(f"svd method must be one of {SVD_METHODS}, got {method!r}")
    gen = torch.Generator(device=matrix.device).manual_seed(seed)
    omega = torch.randn(n, cols, generator=gen, device=matrix.device, dtype=matrix.dtype)  # (n, 2r)
    basis = torch.linalg.qr(matrix @ omega).Q  # (m, 2r)
    for _ in range(power_iters):
        basis = torch.linalg.qr(matrix @ torch.linalg.qr(matrix.T @ basis).Q).Q  # (m, 2r)
    Ub, S, Vh = torch.linalg.svd(basis.T @ matrix, full_matrices=False)  # (2r, n) -> (2r, 2r), (2r,), (2r, n)
    return (basis @ Ub)[:, :rank], S[:rank], Vh[:rank]


@torch.no_grad()
def loftq_init(
    weight: torch.Tensor,
    spec: QuantSpec,
    rank: int,
    scaling: float,
    iters: int = 5,
    svd: str = "randomized",
) -> LoftQResult:
    """LoftQ for one (out, in) weight: the quantized base and LoRA A, B (see module docstring)."""
    if weight.dim() != 2:
        raise ValueError(f"loftq_init: weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    if spec.is_float:
        raise ValueError("loftq_init: spec format 'float' is not quantized; LoftQ needs a quantized format")
    out_f, in_f = weight.shape
    if not 0 < rank <= min(out_f, in_f):
        raise ValueError(f"loftq_init: rank must be in 1..{min(out_f, in_f)} for a {out_f}x{in_f} weight, got {rank}")
    if not scaling > 0:
        raise ValueError(f"loftq_init: scaling must be positive, got {scaling}")
    if iters < 1:
        raise ValueError(f"loftq_init: iters must be >= 1, got {iters}")
    spec.check_layer("loftq_init", in_f)

    W = weight.detach().float()
    low_rank = torch.zeros_like(W)  # s · B_{t-1} A_{t-1}, zero at the start
    errors: list[float] = []
    quant_error = 0.0
    best: tuple[QuantizedWeight, torch.Tensor, torch.Tensor] | None = None
    for t in range(iters):
        q = quantize_weight(W - low_rank, spec)
        residual = W - q.dequantize(torch.float32)  # R_t, (out, in)
        if t == 0:
            quant_error = float(residual.norm())
        U, S, Vh = low_rank_svd(residual, rank, svd)  # (out, r), (r,), (r, in)
        low_rank = (U * S) @ Vh  # s · B_t A_t = U S Vᵀ, (out, in)
        errors.append(float((residual - low_rank).norm()))
        log.debug("loftq iter %d/%d: error %.6g (quantization alone %.6g)", t + 1, iters, errors[-1], quant_error)
        if best is None or errors[-1] < min(errors[:-1]):
            root = S.sqrt() / math.sqrt(scaling)  # (r,)
            best = (q, root[:, None] * Vh, U * root)  # Q, A (r, in), B (out, r)
    assert best is not None
    q, A, B = best
    return LoftQResult(
        qweight=q,
        lora_A=A.contiguous(),
        lora_B=B.contiguous(),
        errors=errors,
        quant_error=quant_error,
        weight_norm=float(W.norm()),
        best_iter=min(range(len(errors)), key=errors.__getitem__),
        scaling=scaling,
        spec=spec,
    )


def _block_index(name: str, prefixes: list[str]) -> int | None:
    for i, prefix in enumerate(prefixes):
        if name.startswith(prefix + "."):
            return i
    return None


def _resolve_targets(model: nn.Module, targets: list[str] | None) -> list[str]:
    """Full module names; a target is a full name or a leaf name such as "q_proj"."""
    layers = quantizable_layers(model)
    if targets is None:
        return layers
    names = set(dict(model.named_modules()))
    chosen: list[str] = []
    for target in targets:
        if target in names:
            hits = [target]
        else:
            hits = [n for n in layers if n.rsplit(".", 1)[-1] == target]
        if not hits:
            raise ValueError(
                f"LoftQ target {target!r} matches no module: expected a module name or a leaf like 'q_proj'"
            )
        chosen += [h for h in hits if h not in chosen]
    return chosen


@torch.no_grad()
def loftq_init_model(
    model: nn.Module,
    loftq_config: LoftQConfig,
    lora_rank: int,
    lora_alpha: float,
    targets: list[str] | None = None,
    use_rslora: bool = False,
    progress: bool = True,
) -> dict[str, LoftQResult]:
    """Replace each target linear layer by a QuantLinear holding its LoftQ base, in place.

    targets: module names or leaf names (default: every linear layer in the decoder blocks).
    Block i gets `loftq_config.spec_for_layer(i, n_blocks)`; layers outside the blocks get
    the main bits. Returns {name: LoftQResult}; lora_A, lora_B there are the adapter's
    initial weights for scaling lora_alpha / lora_rank (rsLoRA: / sqrt(lora_rank)).
    """
    scaling = lora_scaling(lora_rank, lora_alpha, use_rslora)
    names = _resolve_targets(model, targets)
    blocks = decoder_blocks(model)
    block_names = {id(m): n for n, m in model.named_modules()}
    prefixes = [block_names[id(b)] for b in blocks]
    plan: list[tuple[str, int | None, QuantSpec]] = []
    for name in names:
        index = _block_index(name, prefixes)
        spec = loftq_config.spec_for_layer(index, len(blocks))
        spec.check_layer(name, linear_shape(model.get_submodule(name))[1])
        plan.append((name, index, spec))

    results: dict[str, LoftQResult] = {}
    bar = tqdm(plan, desc="loftq", disable=not progress, leave=False)
    for name, index, spec in bar:
        module = model.get_submodule(name)
        weight = weight_of(module)
        bias = getattr(module, "bias", None)
        res = loftq_init(weight, spec, lora_rank, scaling, loftq_config.iters, loftq_config.svd)
        res.layer_index = index
        set_module(model, name, QuantLinear(res.qweight, bias))
        results[name] = res
        log.info(
            "loftq %s (%s): quantization error %.4g -> %s (relative %.4f -> %.4f)",
            name,
            spec.label(),
            res.quant_error,
            " ".join(f"{e:.4g}" for e in res.errors),
            res.quant_error / res.weight_norm,
            res.error / res.weight_norm,
        )
        rel_q, rel_l = res.quant_error / res.weight_norm, res.error / res.weight_norm
        bar.set_postfix_str(f"{spec.bits}b rel.err {rel_q:.3f}->{rel_l:.3f}")
    return results

