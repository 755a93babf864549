"""Invariants of every quantization format: packing, error bounds, storage, the tiled matmul."""

from __future__ import annotations

import pytest
import torch

from restora.quant import QuantSpec, quantize_weight
from restora.quant.packing import interleave, pack_codes, unpack_codes

SPECS = [
    QuantSpec("nf4", 4),
    QuantSpec("nf4", 4, double_quant=True),
    QuantSpec("fp4", 4),
    QuantSpec("fp4", 4, double_quant=True),
    QuantSpec("int8", 8),
    QuantSpec("int8", 8, group_size=-1),
    QuantSpec("rtn", 2),
    QuantSpec("rtn", 3),
    QuantSpec("rtn", 4),
    QuantSpec("rtn", 8),
    QuantSpec("rtn", 3, group_size=-1),
]


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_pack_unpack_roundtrip(bits):
    codes = torch.randint(0, 2**bits, (7, 96), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (7, 96 * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack_codes(packed, bits, 96), codes)


@pytest.mark.parametrize("per", [2, 4, 8])
def test_interleave_is_stack_on_any_byte_order(per, monkeypatch):
    import sys

    parts = [torch.randint(0, 256, (3, 5, 16), dtype=torch.uint8) for _ in range(per)]
    want = torch.stack(parts, dim=-1).flatten(-2)  # out[..., i*per + j] = parts[j][..., i]
    assert torch.equal(interleave(parts), want)
    monkeypatch.setattr(sys, "byteorder", "big")  # the fallback: torch.stack itself
    assert torch.equal(interleave(parts), want)


def test_compiled_unpack_equals_eager():
    pytest.importorskip("torch._inductor")
    codes = torch.randint(0, 16, (10, 128), dtype=torch.uint8)
    packed = pack_codes(codes, 4)
    unpack = torch.compile(lambda p: unpack_codes(p, 4, 128), dynamic=True)
    assert torch.equal(unpack(packed), codes) and torch.equal(unpack(packed[2:9]), codes[2:9])


def test_pack_layout_is_dense_little_endian():
    # 3-bit codes 1..8 (mod 8) -> one 24-bit word per 8 codes, code i at bit 3i
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=torch.uint8)
    word = sum(int(c) << (3 * i) for i, c in enumerate(codes[0]))
    assert pack_codes(codes, 3)[0].tolist() == [word & 255, (word >> 8) & 255, (word >> 16) & 255]


def test_pack_rejects_bad_lengths():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_codes(torch.zeros(1, 12, dtype=torch.uint8), 3)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label())
def test_dequantization_error_bounds(spec):
    torch.manual_seed(1)
    w = torch.randn(48, 128) * 0.05
    q = quantize_weight(w, spec)
    d = q.dequantize()
    assert d.shape == w.shape
    g = w.shape[1] if spec.group_size == -1 else spec.group_size
    blocks = w.view(48, -1, g)
    err = (d - w).abs().view(48, -1, g)
    if spec.format in ("rtn",):
        # inside the grid, half a step; the integer zero point may clip the ends by up to half a step more
        step = ((blocks.amax(-1).clamp(min=0) - blocks.amin(-1).clamp(max=0)) / (2**spec.bits - 1)).unsqueeze(-1)
        assert (err <= step * (1 + 1e-2) + 1e-6).all()
        assert (err.mean(-1, keepdim=True) <= step * 0.5).all()
    elif spec.format == "int8":
        step = blocks.abs().amax(-1) / 127
        assert (err <= step.unsqueeze(-1) * 0.5 * (1 + 1e-3) + 1e-7).all()
    else:
        # 4-bit codes: the widest gap between neighbouring code values is < 0.34 (nf4) / 0.34 (fp4) of absmax
        absmax = blocks.abs().amax(-1, keepdim=True)
        slack = 1.05 if spec.double_quant else 1.0  # double quant perturbs absmax slightly
        assert (err <= 0.5 * 0.34 * absmax * slack + 1e-6).all()
    # more bits -> smaller error, and never worse than returning zeros
    assert (d - w).norm() < w.norm()


def test_more_bits_less_error():
    torch.manual_seed(2)
    w = torch.randn(64, 256)
    errs = [(quantize_weight(w, QuantSpec("rtn", b)).dequantize() - w).norm().item() for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label())
def test_tiled_matmul_forward_and_backward(spec, monkeypatch):
    import restora.quant.base as base

    monkeypatch.setattr(base, "TILE_ELEMENTS", 128 * 5)  # force several tiles of 5 rows
    torch.manual_seed(3)
    w = torch.randn(23 * 2, 128)
    q = quantize_weight(w, spec)
    d = q.dequantize()
    x = torch.randn(2, 3, 128, requires_grad=True)
    y = q(x)
    assert torch.allclose(y, x @ d.T, atol=1e-5)
    y.square().sum().backward()
    assert torch.allclose(x.grad, (2 * (x @ d.T)) @ d, atol=1e-4)
    # dequantize of a row range equals the slice of the full dequantization
    assert torch.equal(q.dequantize(torch.float32, 7, 19), d[7:19])


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label())
def test_storage_size_is_bits_times_weights_plus_scales(spec):
    out_f, in_f = 64, 256
    q = quantize_weight(torch.randn(out_f, in_f), spec)
    n = out_f * in_f
    g = in_f if spec.group_size == -1 else spec.group_size
    groups = n // g
    if spec.format in ("nf4", "fp4"):
        scales = groups * 1 + 4 * -(-groups // 256) + 4 if spec.double_quant else groups * 4
    elif spec.format == "int8":
        scales = groups * 4
    else:
        scales = groups * (2 + 1)  # fp16 scale + uint8 zero point
    assert q.nbytes() == n * spec.bits // 8 + scales


def test_three_bit_is_three_sixteenths_of_bf16():
    q = quantize_weight(torch.randn(1536, 576), QuantSpec("rtn", 3, group_size=64))
    ratio = q.nbytes() / (1536 * 576 * 2)
    assert 3 / 16 <= ratio < 3 / 16 + 0.03  # codes + 24 bits of scale/zero per 64 weights


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(format="nf4", bits=3), "does not support 3 bits"),
        (dict(format="rtn", bits=5), "does not support 5 bits"),
        (dict(format="int4", bits=4), "unknown format"),
        (dict(format="rtn", bits=4, double_quant=True), "double_quant applies to nf4/fp4 only"),
        (dict(format="rtn", bits=4, group_size=0), "group_size must be positive"),
    ],
)
def test_bad_specs_are_one_line_errors(kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        QuantSpec(**kwargs)
    assert "\n" not in str(e.value)


def test_group_size_must_divide_in_features():
    with pytest.raises(ValueError, match="group size 128 does not divide in_features 576"):
        QuantSpec("rtn", 4, group_size=128).check_layer("model.layers.0.self_attn.q_proj", 576)


@pytest.mark.parametrize("spec", [QuantSpec("nf4", 4, double_quant=True), QuantSpec("rtn", 4), QuantSpec("int8", 8)],
                         ids=str)
def test_cast_unquantized_leaves_the_formats_and_the_ties(spec):
    """A 4-bit base trained in bf16 holds its other parts as a bf16 base does (restora train); its quantized
    weights keep their own dtypes, and the tied head stays the embedding."""
    from conftest import tiny_llama

    from restora.quant import quantize_model
    from restora.quant.base import QuantizedWeight
    from restora.quant.model import cast_unquantized

    model = quantize_model(tiny_llama(), spec, progress=False)
    quantized = {n: (t.dtype, t.data_ptr()) for q in model.modules() if isinstance(q, QuantizedWeight)
                 for n, t in q.state_dict().items()}
    x = torch.randint(0, 256, (1, 9))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(x).logits.float()
    cast_unquantized(model, torch.bfloat16)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert all(m.weight.dtype == torch.bfloat16 for m in model.modules() if type(m).__name__ == "LlamaRMSNorm")
    after = {n: (t.dtype, t.data_ptr()) for q in model.modules() if isinstance(q, QuantizedWeight)
             for n, t in q.state_dict().items()}
    assert after == quantized  # not converted, not even copied
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        now = model(x).logits.float()
    assert torch.allclose(now, before, atol=0.05)  # the same model up to bf16 rounding of its float parts
