"""NF4/FP4 against the real bitsandbytes (CPU): codes and absmax bit for bit."""

from __future__ import annotations

import pytest
import torch

from restora.quant.nf4 import FP4_CODE, NF4_CODE, NF4Weight, dynamic_map

bnbF = pytest.importorskip("bitsandbytes.functional")
pytestmark = pytest.mark.peer

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (130, 64)]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_code_tables_match(quant_type):
    ours = torch.tensor(NF4_CODE if quant_type == "nf4" else FP4_CODE)
    assert torch.equal(ours, bnbF.get_4bit_type(quant_type, device="cpu"))


def test_dynamic_map_matches_up_to_the_search_endpoint():
    ref = bnbF.create_dynamic_map().sort().values
    ours = torch.tensor(dynamic_map())
    assert torch.equal(ours[1:], ref[1:])
    assert ours[0] == -1.0  # bitsandbytes' CPU quantizer also sets code[0] = -1 before searching


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", [0.02, 1.0])
def test_codes_and_absmax_bit_exact(quant_type, shape, scale):
    torch.manual_seed(hash((quant_type, shape)) % 1000)
    w = torch.randn(*shape) * scale
    packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=False)
    ours = NF4Weight.quantize(w, quant_type, 64, double_quant=False)
    assert torch.equal(ours.codes.reshape(-1), packed.reshape(-1))
    assert torch.equal(ours.absmax, state.absmax)
    assert torch.equal(ours.dequantize(), bnbF.dequantize_4bit(packed, state))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", SHAPES)
def test_double_quant_matches_and_is_nearest(quant_type, shape):
    torch.manual_seed(7)
    w = torch.randn(*shape) * 0.02
    packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=True)
    ours = NF4Weight.quantize(w, quant_type, 64, double_quant=True)
    assert torch.equal(ours.codes.reshape(-1), packed.reshape(-1))  # 4-bit codes: bit for bit
    assert torch.equal(ours.absmax_scale, state.state2.absmax)  # second-level scales
    assert torch.equal(ours.absmax_offset, state.offset)  # subtracted mean
    # 8-bit absmax codes: equal, except where bitsandbytes' approximate search did not pick the nearest
    plain = NF4Weight.quantize(w, quant_type, 64, double_quant=False).absmax
    code = torch.tensor(dynamic_map())
    blocks = torch.arange(plain.numel()) // 256
    normed = (plain - state.offset) / state.state2.absmax[blocks]
    d_ours = (normed - code[ours.absmax_codes.long()]).abs()
    d_bnb = (normed - code[state.absmax.long()]).abs()
    differ = ours.absmax_codes != state.absmax
    assert (d_ours <= d_bnb).all()
    assert (d_ours[differ] < d_bnb[differ]).all()
    assert differ.float().mean() < 0.01
    assert ((ours.absmax_codes.int() - state.absmax.int()).abs() <= 1).all()
