"""GPTQ: post-training quantization with second-order error compensation.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", ICLR 2023.

For one linear layer with weight W (out, in) and calibration inputs X (n, in), GPTQ picks
codes Q on the k-bit grid that keep the layer's output close:

    min_Q || X Wᵀ − X Qᵀ ||²,   i.e. per row w:  (w − q) H (w − q)ᵀ / 2,   H = 2/n · Xᵀ X   (in, in)

Rows are independent given H. Columns are rounded one at a time in a fixed order (Optimal
Brain Surgeon with the order fixed); after rounding column j the columns F that come after it
absorb the error:

    δ   = (w_j − q_j) / [U]_jj                     (out,)      U = upper Cholesky factor of H⁻¹
    w_F ← w_F − δ · [U]_j,F                        (out, |F|)

Section 4 of the paper makes this fast and stable:
  * Cholesky: the rows of H⁻¹ needed in this order are the rows of U, so H⁻¹ is never updated.
    Dampening λ = damp · mean diag(H) is added to the diagonal first; inputs that never fire
    (H_jj = 0, "dead") get H_jj = 1 and a zero weight.
  * Lazy batch updates: columns go in blocks of B = block_size. Inside a block the update touches
    the block only; the rest of W gets one (out, B) @ (B, rest) product per block. The same trick is
    applied once more inside a block (sub-blocks of 32 columns) to keep the rank-1 updates in cache.
  * Act-order (optional): columns in order of decreasing diag(H), so the most salient inputs are
    rounded first, while the most columns remain to absorb their error. Groups are then formed in
    that permuted order; g_idx maps each original column to its group.

Group parameters (scale, zero per `group_size` columns of a row) are set when the loop reaches a
group's first column, from the current (already error-compensated) weights of that group, with
restora.quant.uniform's grid, so the codes mean exactly what UniformWeight stores. Pending lazy
updates are applied to those weights first (the reference code reads the stale copy when a group
starts inside a block), so the result does not depend on block_size beyond float rounding.

`gptq_quantize_model` runs this over a whole model block by block, as in the paper's
sequential scheme.

  * Block 0's inputs are captured once per calibration row (a pre-hook raises as soon as block 0
    is called), with every keyword argument the block needs (attention mask, rotary position
    embeddings, ...).
  * For each block, forward hooks on its linear layers gather their inputs over all calibration
    rows (one row at a time, no padding), H = 2/n Σ x xᵀ in float32.
  * All layers of a block are quantized from the float block's inputs ("true sequential" off, as
    GPTQModel allows). Layers that read the very same input tensor (q/k/v, gate/up) share H and are
    quantized as one stacked matrix: rows are independent, so the codes are the same as one by one.
  * The block's outputs are then recomputed with the quantized weights and become the next block's
    inputs: each block is quantized with inputs that came through the already-quantized earlier
    blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from restora.quant.blockwise import StopForward, capture_block_inputs, run_block
from restora.quant.linear import QuantLinear, linear_shape, weight_of
from restora.quant.model import check_spec_fits, quantizable_layers
from restora.core.modules import decoder_blocks, set_module
from restora.quant.spec import QuantSpec
from restora.quant.uniform import UniformWeight, quantize_with, uniform_params

INPUT_BYTES = 512 * 2**20  # calibration inputs kept whole up to this; a running Σ XᵀX beyond it

__all__ = ["gptq_quantize", "gptq_codes", "gptq_quantize_model", "GPTQCodes", "hessian_of"]


class GPTQCodes(NamedTuple):
    """What GPTQ chose for a weight (out, in); columns in their original order."""

    codes: torch.Tensor  # (out, in) integer codes in [0, 2^k)
    scales: torch.Tensor  # (out, groups) fp16-representable float32
    zeros: torch.Tensor  # (out, groups) integer zero points
    g_idx: torch.Tensor | None  # (in,) group of each original column; act-order only
    loss: float  # Σ δ² / 2, the paper's per-layer error estimate


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    """H = 2/n · Xᵀ X in float32 for inputs x (..., in)."""
    x = x.reshape(-1, x.shape[-1]).float()  # (n, in)
    return (x.T @ x).mul_(2.0 / max(1, x.shape[0]))  # (in, in)


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹, λ = damp · mean diag(H); λ grows if H is not PD.

    With J the reversal permutation and J (H + λI) J = L Lᵀ, U = J L⁻¹ J is upper triangular and
    Uᵀ U = (H + λI)⁻¹: one factorization and one triangular solve.
    """
    n = h.shape[0]
    mean_diag = h.diagonal().mean().item()
    lam = damp * mean_diag
    for _ in range(6):
        hd = h.flip(0, 1)  # J H J, a copy
        hd.diagonal().add_(lam)
        low, info = torch.linalg.cholesky_ex(hd)
        del hd  # each (n, n) copy dropped as soon as it is used: at n = 14,336 one is 822 MB
        if info.item() == 0:
            eye = torch.eye(n, dtype=h.dtype, device=h.device)
            inv_low = torch.linalg.solve_triangular(low, eye, upper=False)
            del low, eye
            return inv_low.flip(0, 1)  # (n, n) upper
        lam = lam * 10 if lam > 0 else 0.01 * mean_diag
    raise ValueError(f"gptq: Hessian is not positive definite even with dampening {lam:.3g} (damp={damp})")


# Columns per inner lazy batch: rank-1 updates touch only these, the rest of the block gets a GEMM.
_SUB = 32


def _current(
    wt: torch.Tensor, wt1: torch.Tensor, err1: torch.Tensor, u: torch.Tensor,
    i1: int, i2: int, j1: int, j2: int, i: int, gs: int,
) -> torch.Tensor:
    """Current weights (gs, out) of the group starting at block column i, pending lazy updates applied.

    Columns before j2 are up to date; block columns in [j2, i2) still miss the updates of
    sub-block columns [j1, i); columns from i2 on miss those of block columns [i1, i1 + i).
    """
    a = wt1[i : min(j2, i + gs)]
    e = min(i2 - i1, i + gs)
    b = wt1[j2:e] - u[i1 + j1 : i1 + i, i1 + j2 : i1 + e].T @ err1[j1:i] if e > j2 else wt1[:0]
    end = i1 + i + gs
    c = wt[i2:end] - u[i1 : i1 + i, i2:end].T @ err1[:i] if end > i2 else wt1[:0]
    return torch.cat([a, b, c])


@torch.no_grad()
def gptq_codes(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, consume: bool = False) -> GPTQCodes:
    """The GPTQ algorithm (paper, Algorithm 1) on one weight (out, in) with Hessian (in, in).

    It works on Wᵀ (in, out) so that a column of W is a contiguous row in memory.
    """
    out_f, in_f = weight.shape
    if hessian.shape != (in_f, in_f):
        raise ValueError(f"gptq: hessian shape {tuple(hessian.shape)} does not match weight inputs {in_f}")
    if spec.group_size != -1 and in_f % spec.group_size:
        raise ValueError(f"gptq: group size {spec.group_size} does not divide in_features {in_f}")
    bits, gs, bs = spec.bits, (in_f if spec.group_size == -1 else spec.group_size), spec.block_size
    wt = weight.detach().float().T.contiguous()  # (in, out): Wᵀ, a copy
    h = hessian.detach().to(wt.device, torch.float32)  # (in, in)
    if h is hessian and not consume:  # `consume`: the caller hands H over, so it may be changed in place
        h = h.clone()
    del hessian

    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    wt[dead] = 0.0
    perm = None
    if spec.act_order:
        perm = torch.argsort(h.diagonal(), descending=True)  # (in,)
        wt = wt[perm]
        h = h[perm][:, perm]
    u = _inverse_cholesky(h, spec.damp)  # (in, in) upper
    del h

    codes = torch.zeros_like(wt)  # (in, out), permuted order
    scales = wt.new_zeros(in_f // gs, out_f)  # (groups, out)
    zeros = wt.new_zeros(in_f // gs, out_f)
    loss = wt.new_zeros(())
    scale = zero = wt.new_zeros(out_f)
    for i1 in range(0, in_f, bs):
        i2 = min(i1 + bs, in_f)
        wt1 = wt[i1:i2].clone()  # (b, out) the block's columns, updated in place
        err1 = torch.zeros_like(wt1)  # (b, out) δ of each column
        u1 = u[i1:i2, i1:i2]  # (b, b)
        d1 = u1.diagonal().tolist()
        for j1 in range(0, i2 - i1, _SUB):  # the same lazy trick once more, sized for a CPU cache
            j2 = min(j1 + _SUB, i2 - i1)
            for i in range(j1, j2):
                col = i1 + i
                if col % gs == 0:  # a new group: its grid from its current weights
                    seg = _current(wt, wt1, err1, u, i1, i2, j1, j2, i, gs)  # (gs, out)
                    scale, zero = uniform_params(seg.T, bits)  # (out,), (out,)
                    scales[col // gs] = scale
                    zeros[col // gs] = zero
                w = wt1[i]  # (out,)
                c = quantize_with(w, scale, zero, bits)
                codes[col] = c
                delta = (w - (c - zero) * scale).div_(d1[i])  # δ = (w − q) / U_jj
                err1[i] = delta
                wt1[i:j2].addr_(u1[i, i:j2], delta, alpha=-1.0)  # w_F -= δ ⊗ U_j,F inside the sub-block
            wt1[j2:].addmm_(u1[j1:j2, j2:].T, err1[j1:j2], alpha=-1.0)  # rest of the block
        loss += err1.square().sum() / 2
        wt[i2:].addmm_(u[i1:i2, i2:].T, err1, alpha=-1.0)  # lazy update of the rest of W

    g_idx = None
    if perm is not None:
        inv = torch.argsort(perm)  # original column j sits at permuted position inv[j]
        codes = codes[inv]
        g_idx = (inv // gs).to(torch.int32)  # (in,)
    return GPTQCodes(codes.T.contiguous(), scales.T.contiguous(), zeros.T.contiguous(), g_idx, float(loss))


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec) -> UniformWeight:
    """GPTQ-quantize one weight (out, in) given its Hessian (in, in); a UniformWeight, method gptq."""
    r = gptq_codes(weight, hessian, spec)
    return UniformWeight.from_codes(r.codes, r.scales, r.zeros, spec.bits, spec.group_size, "gptq", g_idx=r.g_idx)


# -- whole model, block by block ------------------------------------------------------------


class _InputCollector:
    """Forward pre-hooks on a block's linear layers gathering their inputs, once per distinct tensor.

    Layers called with the very same tensor object within a row (q/k/v, gate/up) share one
    `leader` whose inputs stand for all of them. Once every layer has seen its input, the rest of
    the block (the last projection, the residual) is skipped by raising StopForward.
    """

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        self.leader: dict[str, str] = {}
        self.inputs: dict[str, list[torch.Tensor]] = {}
        # Inputs are kept whole up to INPUT_BYTES; past it (big calibration sets on big models) the collector keeps
        # a running Σ XᵀX and row count per leader instead: the same H up to float summation order.
        self.accumulate = False
        self._bytes = 0
        self._xtx: dict[str, torch.Tensor] = {}
        self._count: dict[str, int] = {}
        self._row: list[tuple[torch.Tensor, str]] = []
        self._fired: set[str] = set()
        self._n = len(layers)
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in layers.items()]

    def run(self, block: nn.Module, hidden: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """One calibration row through the float block, hooks gathering."""
        self._row, self._fired = [], set()
        try:
            run_block(block, hidden, args, kwargs)
        except StopForward:
            pass
        self._row = []

    def _hook(self, name: str) -> Any:
        def fn(_m: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            lead = next((n for t, n in self._row if t is x), None)
            if lead is None:
                lead = name
                self._row.append((x, name))
                rows = x.detach().reshape(-1, x.shape[-1]).float()  # (n, in)
                if self.accumulate:
                    self.inputs.setdefault(name, [])
                    xtx = rows.T @ rows  # (in, in)
                    self._xtx[name] = self._xtx[name].add_(xtx) if name in self._xtx else xtx
                    self._count[name] = self._count.get(name, 0) + rows.shape[0]
                else:
                    self.inputs.setdefault(name, []).append(rows.clone())
                    self._bytes += rows.numel() * 4
                    if self._bytes > INPUT_BYTES:
                        self._start_accumulating()
            if self.leader.setdefault(name, lead) != lead:
                raise RuntimeError(f"gptq: layer {name} changed which layers share its input between rows")
            self._fired.add(name)
            if len(self._fired) == self._n:
                raise StopForward

        return fn

    def _start_accumulating(self) -> None:
        self.accumulate = True
        for name, kept in self.inputs.items():
            for rows in kept:
                xtx = rows.T @ rows  # (in, in)
                self._xtx[name] = self._xtx[name].add_(xtx) if name in self._xtx else xtx
                self._count[name] = self._count.get(name, 0) + rows.shape[0]
            self.inputs[name] = []

    def hessian(self, lead: str) -> torch.Tensor:
        """H = 2/n · Xᵀ X of the leader's inputs (from the running sum when accumulating); frees them."""
        if self.accumulate:
            return self._xtx.pop(lead).mul_(2.0 / max(1, self._count[lead]))
        h = hessian_of(torch.cat(self.inputs[lead]))  # (in, in) from (n, in)
        self.inputs[lead] = []
        return h

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def prefix_of(model: nn.Module, blocks: nn.Module) -> str:
    """The module name of the decoder block list (e.g. model.layers)."""
    return next(n for n, m in model.named_modules() if m is blocks)


def _dense_standin(q: QuantLinear, dtype: torch.dtype) -> nn.Linear:
    """An nn.Linear with the dequantized weight: the same numbers QuantLinear multiplies by,
    without dequantizing again at every calibration row."""
    lin = nn.utils.skip_init(
        nn.Linear, q.in_features, q.out_features, bias=q.bias is not None, device=q.qweight.qweight.device, dtype=dtype
    )
    lin.weight.data = q.dequantize(dtype)
    if q.bias is not None:
        lin.bias.data = q.bias.to(dtype)
    return lin


@torch.no_grad()
def gptq_quantize_model(
    model: nn.Module,
    spec: QuantSpec,
    calibration: list[torch.Tensor],
    progress: bool = True,
    before_block: Callable[[int, nn.Module], None] | None = None,
    after_block: Callable[[int, nn.Module], None] | None = None,
) -> nn.Module:
    """Replace every decoder linear layer of `model` by a GPTQ QuantLinear, in place.

    `calibration` is a list of 1-D token-id tensors (any lengths). Returns the model.
    Block by block: `before_block(b, block)` runs first (a streaming load fills the block's float weights there,
    restora.models.stream, so only that block's are ever resident), `after_block(b, block)` once it is quantized.
    The calibration rows' hidden states are carried from block to block in the model's dtype.
    """
    if spec.format != "gptq":
        raise ValueError(f"gptq_quantize_model needs a gptq spec, got format {spec.format!r}")
    if not calibration:
        raise ValueError("gptq needs calibration data: got an empty list of rows")
    for k, ids in enumerate(calibration):
        if ids.dim() != 1 or ids.numel() == 0 or ids.is_floating_point():
            raise ValueError(
                f"calibration row {k}: expected a non-empty 1-D tensor of token ids, got {tuple(ids.shape)}"
            )
    names = quantizable_layers(model)
    check_spec_fits(model, spec, names)
    blocks = decoder_blocks(model)
    prefix = prefix_of(model, blocks)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        rows = capture_block_inputs(model, blocks[0], calibration, device)
        bar = tqdm(total=len(names), desc=f"gptq {spec.label()}", disable=not progress, leave=False)
        for b, block in enumerate(blocks):
            if before_block is not None:
                before_block(b, block)
            mine = [n for n in names if n.startswith(f"{prefix}.{b}.")]
            layers = {n: model.get_submodule(n) for n in mine}
            collector = _InputCollector(layers)
            try:
                for hidden, args, kwargs in rows:
                    collector.run(block, hidden, args, kwargs)
            finally:
                collector.remove()

            quantized: dict[str, QuantLinear] = {}
            for lead in collector.inputs:
                group = [n for n in mine if collector.leader.get(n) == lead]
                w = torch.cat([weight_of(layers[n]) for n in group])  # (Σ out, in): rows are independent
                r = gptq_codes(w, collector.hessian(lead), spec, consume=True)  # H freed inside, not held here
                start = 0
                for n in group:
                    out_f, _ = linear_shape(layers[n])
                    rows_ = slice(start, start + out_f)
                    qw = UniformWeight.from_codes(
                        r.codes[rows_], r.scales[rows_], r.zeros[rows_], spec.bits, spec.group_size, "gptq", r.g_idx
                    )
                    quantized[n] = QuantLinear(qw, getattr(layers[n], "bias", None))
                    start += out_f
                    bar.update(1)
                bar.set_postfix_str(f"block {b} {lead.rsplit('.', 1)[-1]} loss {r.loss:.3g}")
            missing = [n for n in mine if n not in quantized]
            if missing:
                raise ValueError(f"gptq: layers {missing} received no calibration input")

            for n, q in quantized.items():  # outputs of the quantized block feed the next block
                set_module(model, n, _dense_standin(q, layers[n].weight.dtype))
            rows = [(run_block(block, hidden, args, kwargs), args, kwargs) for hidden, args, kwargs in rows]
            for n, q in quantized.items():
                set_module(model, n, q)
            del layers
            if after_block is not None:
                after_block(b, block)
        bar.close()
    finally:
        model.train(was_training)
    return model
