"""restora's 4-bit dequantization kernel (restora.kernels.dequant4): bit for bit the formats' torch formulas, for
uniform codes and code tables (NF4, FP4, double quantized or not), row slices, denormal results, compiled graphs,
its Python and C++ kernels, bad input, and the torch path where it cannot run."""

from __future__ import annotations

import pytest
import torch

from restora.quant import QuantSpec
from restora.kernels import dequant4
from restora.quant.linear import quantize_weight
from restora.quant.nf4 import NF4Weight
from restora.quant.uniform import UniformWeight

needs_kernel = pytest.mark.skipif(not dequant4.available(), reason="no AVX-512 CPU or compiler here")


def _torch_formula(q, monkeypatch: pytest.MonkeyPatch, *rows: int) -> torch.Tensor:
    with monkeypatch.context() as m:
        m.setattr(dequant4, "fits", lambda *a: False)
        return q.dequantize(torch.bfloat16, *rows)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype == torch.bfloat16 and torch.equal(a.view(torch.int16), b.view(torch.int16))


def _weight(out_f: int, in_f: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    w[0] = 0.0  # an all-zero row: zero scales (uniform) and zero absmax (tables)
    w[1, : in_f // 2] *= 300.0  # large and small groups in one row
    return w


def _layers(out_f: int, in_f: int, group: int) -> list:
    w = _weight(out_f, in_f)
    layers = [quantize_weight(w, QuantSpec("rtn", 4, group_size=group))]
    for fmt in ("nf4", "fp4"):
        layers.append(quantize_weight(w, QuantSpec(fmt, 4, group_size=group)))
        layers.append(quantize_weight(w, QuantSpec(fmt, 4, group_size=group, double_quant=True)))
    return layers


@needs_kernel
@pytest.mark.parametrize("shape", [(64, 64, 32), (48, 576, 64), (40, 1536, 64), (33, 256, 128), (16, 96, 32)])
def test_every_format_dequantizes_to_the_torch_formulas_bits(shape, monkeypatch):
    out_f, in_f, group = shape
    for q in _layers(out_f, in_f, group):
        assert dequant4.fits(getattr(q, "qweight", getattr(q, "codes", None)), in_f, group)
        for rows in ((), (3, out_f - 2), (out_f - 1, out_f)):
            got = q.dequantize(torch.bfloat16, *rows)
            want = _torch_formula(q, monkeypatch, *rows)
            assert _same_bits(got, want), f"{type(q).__name__} {q.meta()} rows {rows}"


@needs_kernel
def test_uniform_codes_at_every_level_and_zero(monkeypatch):
    g = torch.Generator().manual_seed(1)
    codes = torch.arange(16, dtype=torch.uint8).repeat(32, 8)  # (32, 128): every code at both nibbles of a byte
    codes = codes[:, torch.randperm(128, generator=g)]
    scales = torch.rand(32, 2, generator=g) * 0.1 + 1e-4
    scales[0, 0] = 65504.0  # fp16's largest: -z * s rounds to bf16 on its own
    zeros = torch.randint(0, 16, (32, 2), generator=g)
    q = UniformWeight.from_codes(codes, scales, zeros, 4, 64)
    assert _same_bits(q.dequantize(torch.bfloat16), _torch_formula(q, monkeypatch))


@needs_kernel
def test_denormal_products_round_as_torch_does(monkeypatch):
    """bf16 keeps fp32 denormals; a conversion that flushed them (vcvtneps2bf16) would differ here."""
    w = torch.full((16, 64), 3e-39)  # fp32 denormal weights: absmax and products are denormal
    w[:, ::3] = -1.2e-39
    q = quantize_weight(w, QuantSpec("nf4", 4, group_size=64))
    assert isinstance(q, NF4Weight)
    got = q.dequantize(torch.bfloat16)
    assert (got != 0).any()
    assert _same_bits(got, _torch_formula(q, monkeypatch))


@needs_kernel
def test_nan_blocks_give_torchs_nan(monkeypatch):
    q = quantize_weight(_weight(16, 64), QuantSpec("nf4", 4, group_size=32))
    assert isinstance(q, NF4Weight)
    q.absmax.view(torch.int32)[3] = 0x7FFFFFFF  # a NaN whose payload, rounded as a number, would carry into the sign
    got, want = q.dequantize(torch.bfloat16), _torch_formula(q, monkeypatch)
    assert got.isnan().sum() == 32 and torch.equal(got.isnan(), want.isnan())
    assert _same_bits(got.nan_to_num(0.0), want.nan_to_num(0.0))  # NaN payloads: torch's own differ by path


@needs_kernel
def test_a_compiled_graph_calls_the_operator_and_matches_eager():
    for q in _layers(48, 128, 64):
        graphs: list[torch.fx.GraphModule] = []

        def keep(gm: torch.fx.GraphModule, example_inputs: list) -> object:
            graphs.append(gm)
            return gm.forward

        torch._dynamo.reset()
        torch.compile(lambda: q.dequantize(torch.bfloat16), backend=keep, fullgraph=True)()
        assert "restora.dequantize4" in graphs[0].code
        compiled = torch.compile(lambda: q.dequantize(torch.bfloat16) * 2, fullgraph=True)()
        assert _same_bits(compiled, q.dequantize(torch.bfloat16) * 2)


@needs_kernel
def test_python_and_cpp_kernels_agree():
    q = _layers(48, 128, 64)[0]
    args = (q.qweight, q.scales, q.zeros, torch.zeros(16), 128, 64, dequant4.UNIFORM, False)
    assert _same_bits(dequant4._dequantize4(*args), torch.ops.restora.dequantize4(*args))


@needs_kernel
def test_bad_input_names_what_was_expected():
    q = _layers(48, 128, 64)[0]
    with pytest.raises((ValueError, RuntimeError), match="scales must be"):
        torch.ops.restora.dequantize4(q.qweight, q.scales.float(), q.zeros, torch.zeros(16), 128, 64, 0, False)
    with pytest.raises(ValueError, match="scales must be"):
        dequant4._dequantize4(q.qweight, q.scales.float(), q.zeros, torch.zeros(16), 128, 64, 0, False)
    with pytest.raises(ValueError, match="codes must be uint8"):
        dequant4._dequantize4(q.qweight[:, :10], q.scales, q.zeros, torch.zeros(16), 128, 64, 0, False)
    with pytest.raises(ValueError, match="not both"):
        dequant4.dequantize4(q.qweight, q.scales, 128, 64)


def test_shapes_it_cannot_take_and_other_dtypes_keep_the_torch_formula(monkeypatch):
    calls = []
    monkeypatch.setattr(dequant4, "dequantize4", lambda *a, **k: calls.append(1))
    w = _weight(16, 48)
    q = quantize_weight(w, QuantSpec("rtn", 4, group_size=16))  # groups of 16 inputs: not whole 32-input chunks
    q.dequantize(torch.bfloat16)
    q = quantize_weight(_weight(16, 64), QuantSpec("rtn", 4, group_size=64))
    q.dequantize(torch.float32)  # fp32: the torch formula (the kernel writes bf16)
    q3 = quantize_weight(_weight(16, 64), QuantSpec("rtn", 3, group_size=64))
    q3.dequantize(torch.bfloat16)
    assert not calls


def test_disabled_by_environment_leaves_the_torch_formula(monkeypatch):
    q = _layers(16, 64, 32)[0]
    before = q.dequantize(torch.bfloat16)
    monkeypatch.setenv("RESTORA_NATIVE", "0")
    dequant4._library.cache_clear()
    try:
        assert not dequant4._library()
        assert _same_bits(q.dequantize(torch.bfloat16), before)
    finally:
        monkeypatch.delenv("RESTORA_NATIVE")
        dequant4._library.cache_clear()
