"""restora.attention_kernel: the native decoding attention against an fp32 reference, and its fallbacks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from restora import attention_kernel as ak

needs_native = pytest.mark.skipif(not ak.available(), reason="no AVX-512 BF16 CPU or compiler here")


def _case(B: int, Hq: int, Hkv: int, T: int, E: int, D: int, seed: int = 0, capacity: int | None = None):
    g = torch.Generator().manual_seed(seed)
    cap = capacity or E + 7  # the decoder passes a slice of a longer cache
    q = torch.randn(B, Hq, T, D, generator=g).to(torch.bfloat16)
    keys = (torch.randn(B, Hkv, cap, D, generator=g) * 2).to(torch.bfloat16)[:, :, :E]
    values = torch.randn(B, Hkv, cap, D, generator=g).to(torch.bfloat16)[:, :, :E]
    mask = torch.rand(B, 1, T, E, generator=g) > 0.3
    mask[..., -1] = True  # every query sees at least itself, as in the decoder
    return q, keys, values, mask


def _reference(q, keys, values, mask, scale):
    B, Hq, T, D = q.shape
    a = F.scaled_dot_product_attention(q.double(), keys.double(), values.double(), attn_mask=mask, scale=scale,
                                       enable_gqa=keys.shape[1] != Hq)
    return a.transpose(1, 2).reshape(B, T, Hq * D)


@needs_native
@pytest.mark.parametrize("B,Hq,Hkv,T,E,D", [
    (1, 9, 3, 1, 130, 64),  # SmolLM2's heads, one decoding step
    (8, 9, 3, 1, 17, 64),
    (3, 4, 4, 5, 40, 32),  # no grouping, drafts verified
    (2, 8, 2, 16, 300, 128),
    (2, 2, 1, 3, 1, 16),  # one key
    (1, 4, 2, 2, 33, 256),
    (2, 6, 3, 4, 21, 48),  # a 32-wide chunk and a 16-wide tail
])
def test_native_matches_the_fp64_reference(B, Hq, Hkv, T, E, D):
    q, keys, values, mask = _case(B, Hq, Hkv, T, E, D)
    scale = D**-0.5
    out = ak.attention(q, keys, values, mask, scale, Hkv != Hq)
    ref = _reference(q, keys, values, mask, scale)
    assert out.dtype == torch.bfloat16 and out.shape == (B, T, Hq * D)
    # one bf16 rounding of the output (2^-8 relative), plus fp32 accumulation
    assert torch.allclose(out.double(), ref, atol=1e-3, rtol=2**-7), (out.double() - ref).abs().max()


@needs_native
def test_native_and_sdpa_agree(monkeypatch: pytest.MonkeyPatch):
    q, keys, values, mask = _case(4, 9, 3, 3, 70, 64, seed=1)
    native = ak.attention(q, keys, values, mask, 0.125, True)
    monkeypatch.setattr(ak, "_native_fits", lambda *a: False)
    sdpa = ak.attention(q, keys, values, mask, 0.125, True)
    assert torch.allclose(native.float(), sdpa.float(), atol=1e-2, rtol=2**-6)


@needs_native
def test_a_query_that_sees_nothing_gets_zeros():
    q, keys, values, mask = _case(2, 4, 2, 2, 10, 32, seed=2)
    mask[1, :, 0] = False
    out = ak.attention(q, keys, values, mask, 0.2, True)
    assert torch.equal(out[1, 0], torch.zeros_like(out[1, 0]))
    ref = _reference(q, keys, values, mask, 0.2)
    assert torch.allclose(out[0].double(), ref[0], atol=1e-3, rtol=2**-7)


@needs_native
def test_the_mask_hides_keys_exactly():
    """Changing a hidden key or value changes nothing (holes left by rejected drafts, left padding)."""
    q, keys, values, mask = _case(2, 4, 2, 3, 25, 64, seed=3)
    mask[:, :, :, 5:9] = False
    out = ak.attention(q, keys, values, mask, 0.125, True)
    k2, v2 = keys.clone(), values.clone()
    k2[:, :, 5:9] = 100.0
    v2[:, :, 5:9] = -7.0
    assert torch.equal(ak.attention(q, k2, v2, mask, 0.125, True), out)


def test_shapes_the_kernel_does_not_take_use_sdpa():
    q, keys, values, mask = _case(2, 4, 2, 3, 20, 40, seed=4)  # head size 40: not a multiple of 16
    out = ak.attention(q, keys, values, mask, 0.15, True)
    assert torch.allclose(out.double(), _reference(q, keys, values, mask, 0.15), atol=1e-2, rtol=2**-6)
    q, keys, values, mask = _case(1, 4, 2, ak.MAX_QUERIES + 1, 30, 32, seed=5)  # a prompt pass
    out = ak.attention(q, keys, values, mask, 0.15, True)
    assert torch.allclose(out.double(), _reference(q, keys, values, mask, 0.15), atol=1e-2, rtol=2**-6)


def test_float32_caches_use_sdpa():
    q, keys, values, mask = _case(2, 4, 2, 1, 20, 32, seed=6)
    out = ak.attention(q.float(), keys.float(), values.float(), mask, 0.2, True)
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), _reference(q, keys, values, mask, 0.2), atol=1e-5)


@pytest.mark.parametrize("native", [True, False])
def test_compiled_steps_match_eager_without_graph_breaks(native: bool, monkeypatch: pytest.MonkeyPatch):
    if native and not ak.available():
        pytest.skip("no native kernel here")
    if not native:
        monkeypatch.setattr(ak, "_native_fits", lambda *a: False)
    q, keys, values, mask = _case(3, 4, 2, 2, 30, 32, seed=7)
    torch._dynamo.reset()
    fn = torch.compile(lambda *a: ak.attention(*a, 0.125, True) * 2, fullgraph=True, dynamic=True)
    assert torch.equal(fn(q, keys, values, mask), ak.attention(q, keys, values, mask, 0.125, True) * 2)


def test_disabled_by_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("RESTORA_NATIVE", "0")
    ak._library.cache_clear()
    try:
        assert ak._library() is None
        q, keys, values, mask = _case(2, 4, 2, 1, 20, 32, seed=8)
        with pytest.raises(RuntimeError, match="not available"):
            ak._attention_decode(q, keys, values, mask, 0.2)
    finally:
        monkeypatch.delenv("RESTORA_NATIVE")
        ak._library.cache_clear()
