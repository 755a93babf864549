"""restora.kernels.attention_decode: the native decoding attention against an fp32 reference, and its fallbacks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from restora.kernels import attention_decode as ak

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


def test_without_the_cpp_kernels_python_kernels_serve_the_operators(tmp_path):
    """A C++ compiler that fails (CXX=false): one warning, and both operators still compute, through Python."""
    if not ak.available():
        pytest.skip("no native kernel here")
    script = """
import warnings, torch
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    from restora.kernels import attention_decode as ak
    from restora.kernels import native
    from restora.kernels import int4 as ik
    ok = ak.available()
print("cpp", native.cpp_kernels(), "warned", any("C++ kernels did not build" in str(w.message) for w in caught))
g = torch.Generator().manual_seed(0)
q = torch.randn(2, 4, 1, 32, generator=g).bfloat16(); k = torch.randn(2, 2, 9, 32, generator=g).bfloat16()
mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), k.double(), attn_mask=mask,
                                                       enable_gqa=True).transpose(1, 2).reshape(2, 1, 128)
print("attention", torch.allclose(ak.attention(q, k, k, mask, 32 ** -0.5, True).double(), ref, atol=1e-2))
if ik.available():
    codes = torch.randint(0, 16, (32, 64), generator=g)
    scales, zeros = torch.rand(32, 2, generator=g) + 0.1, torch.randint(0, 16, (32, 2), generator=g).float()
    x = torch.randn(3, 64, generator=g).bfloat16()
    w = (codes.view(32, 2, 32) - zeros[..., None]) * scales[..., None]
    y = torch.ops.restora.int4_amx_mm(x, *ik.pack(codes, scales, zeros, 32), ik.UNIFORM_LEVELS, 32, 32)
    print("int4", torch.allclose(y.double(), x.double() @ w.reshape(32, 64).double().T, atol=0.1, rtol=2**-7))
"""
    import os
    import subprocess
    import sys
    env = {**os.environ, "CXX": "false", "RESTORA_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "cpp False warned True" in out.stdout
    assert "attention True" in out.stdout
    from restora.kernels import int4 as ik
    if ik.available():
        assert "int4 True" in out.stdout


def test_the_operators_run_cpp_kernels_where_they_build():
    from restora.kernels import native
    if not ak.available() or not native.cpp_kernels():
        pytest.skip("no C++ compiler or native kernel here")
    from restora.kernels import int4 as ik
    ik.available()
    for op in ("restora::attention_decode", "restora::int4_amx_mm"):
        cpu = [line for line in torch._C._dispatch_dump(op).splitlines() if line.startswith("CPU:")]
        assert len(cpu) == 1 and "native_ops.cpp" in cpu[0], cpu  # not torch/library.py: no Python kernel
