"""restora's int4 kernel (restora.kernels.int4): layout, exactness against the dequantized weight on both of
its paths (AMX tiles, AVX-512 BF16 vectors), the paths UniformWeight takes, compiled graphs, and what happens where
the kernel cannot be built."""

from __future__ import annotations

import warnings

import pytest
import torch

from restora.kernels import native
from restora.quant import QuantSpec
from restora.kernels import int4 as ik
from restora.quant.linear import quantize_weight
from restora.quant.packing import unpack_codes
from restora.quant.uniform import UniformWeight

needs_kernel = pytest.mark.skipif(not ik.available(), reason="no AVX-512 BF16 CPU or compiler here")


def _fits(rows: int) -> bool:
    """The formats send `rows` rows to this machine's kernel (any with AMX, up to VEC_MAX_ROWS without)."""
    return rows <= ik.max_rows()


def _layer(out_f: int, in_f: int, group: int, seed: int = 0) -> UniformWeight:
    g = torch.Generator().manual_seed(seed)
    q = quantize_weight(torch.randn(out_f, in_f, generator=g) * 0.05, QuantSpec("rtn", 4, group_size=group))
    assert isinstance(q, UniformWeight)
    return q


def _reference(x: torch.Tensor, q: UniformWeight) -> torch.Tensor:
    """x @ W^T in fp64 from the fp32 dequantized weight: what the kernel computes before its bf16 output."""
    return (x.double() @ q.dequantize(torch.float32).double().T)


def test_pack_layout_holds_every_code_where_the_kernel_reads_it():
    q = _layer(48, 128, 64)
    codes = unpack_codes(q.qweight, 4, 128).long()  # (48, 128)
    packed, sz = ik.pack(codes, q.scales, q.zeros, 64)
    b = packed.view(3, 32, 16, 2).long()  # tile, quad, output j, e
    for t, p, j, e in [(0, 0, 0, 0), (1, 5, 7, 1), (2, 31, 15, 0), (2, 31, 15, 1)]:
        n, k = 16 * t + j, 4 * p + e
        assert int(b[t, p, j, e] & 15) == int(codes[n, k])
        assert int(b[t, p, j, e] >> 4) == int(codes[n, k + 2])
    assert sz.shape == (3, 2, 2, 16) and sz.dtype == torch.float32
    assert torch.equal(sz[1, 1, 0], q.scales[16:32, 1].float()) and torch.equal(sz[1, 1, 1], q.zeros[16:32, 1].float())


def test_pack_rejects_shapes_the_kernel_cannot_tile():
    q = _layer(40, 128, 64)
    with pytest.raises(ValueError, match=r"out % 16 == 0 and group % 32 == 0, got \(40, 128\) group 64"):
        ik.pack(unpack_codes(q.qweight, 4, 128), q.scales, q.zeros, 64)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 15, 16, 17, 40, 64, 100])
@pytest.mark.parametrize("out_f,in_f,group", [(16, 64, 32), (80, 576, 64), (192, 256, 128), (64, 1536, 64)])
def test_kernel_matches_the_dequantized_weight(rows: int, out_f: int, in_f: int, group: int):
    q = _layer(out_f, in_f, group, seed=rows)
    x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    packed, sz = ik.pack(unpack_codes(q.qweight, 4, in_f), q.scales, q.zeros, group)
    y = ik.int4_amx_mm(x, packed, sz, out_f, group)
    ref = _reference(x, q)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, out_f)
    # exact products, fp32 sums, one rounding to bf16 at the end: within a bf16 step of the fp64 answer
    assert (y.double() - ref).abs().max() <= 2 ** -7 * ref.abs().max() + 1e-6


@needs_kernel
def test_every_row_count_the_kernel_takes_goes_to_it_longer_inputs_dequantize(monkeypatch: pytest.MonkeyPatch):
    q = _layer(96, 128, 64)
    calls: list[int] = []
    real = ik.int4_amx_mm

    def counting(x, *args):
        calls.append(x.shape[0])
        return real(x, *args)

    monkeypatch.setattr(ik, "int4_amx_mm", counting)
    with torch.no_grad():
        for shape in [(1, 1, 128), (2, 128), (1, 3, 128), (64, 128), (3, 200, 128), (2, 600, 128)]:
            x = torch.randn(*shape).to(torch.bfloat16)
            y = q(x)
            assert y.shape == (*shape[:-1], 96)
            ref = _reference(x.reshape(-1, 128), q).reshape(y.shape)
            bound = 2 ** -7 if _fits(x.numel() // 128) else 2 ** -6  # dequantize + GEMM: weights rounded to bf16 too
            assert (y.double() - ref).abs().max() <= bound * ref.abs().max()
    assert calls == [n for n in (1, 2, 3, 64, 600, 1200) if _fits(n)]
    assert getattr(q, "_int4pack", None) is None  # torch's layout is not built beside the kernel's


@needs_kernel
def test_the_vector_path_alone_matches_the_tile_path_where_both_exist():
    """With AMX, up to 4 rows take the vector path and more the tiles; switching the tiles off sends every call
    down the vector path (as on CPUs without AMX), which is exact for any number of rows (its own row sums past
    EXACT_ROWS): the same sums as the tiles up to fp32 order (their long-input path rounds the weights to bf16)."""
    lib, amx = ik._library()
    q = _layer(64, 576, 64)
    packed, sz = ik.pack(unpack_codes(q.qweight, 4, 576), q.scales, q.zeros, 64)
    for rows in (40, 130):
        x = torch.randn(rows, 576, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
        y = ik.int4_amx_mm(x, packed, sz, 64, 64)
        try:
            lib.int4_amx_init(0)
            vec = ik.int4_amx_mm(x, packed, sz, 64, 64)
        finally:
            lib.int4_amx_init(int(amx))
        ref = _reference(x, q)
        assert (vec.double() - ref).abs().max() <= 2 ** -8 * ref.abs().max()
        assert (vec.float() - y.float()).abs().max() <= 2 ** -7 * ref.abs().max()


def test_without_the_kernel_small_batches_use_torchs_kernel_and_prompts_dequantize(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(ik, "available", lambda: False)
    q = _layer(96, 128, 64)
    x = torch.randn(3, 128).to(torch.bfloat16)
    with torch.no_grad():
        fast = q(x)
        slow = x @ q.dequantize(torch.bfloat16).T
    if getattr(q, "_int4pack", None) is None:
        pytest.skip("this torch build has no CPU int4 kernel")
    assert getattr(q, "_amx", None) is None
    # same weights, different summation order: within bf16 rounding of the outputs
    assert torch.allclose(fast.float(), slow.float(), atol=2e-2 * slow.abs().max().item())
    big = torch.randn(200, 128).to(torch.bfloat16)  # long prompts take the dequantize + GEMM path
    with torch.no_grad():
        assert torch.equal(q(big), big @ q.dequantize(torch.bfloat16).T)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 5, 100])
@pytest.mark.parametrize("quant_type,double_quant", [("nf4", False), ("nf4", True), ("fp4", False)])
def test_nf4_and_fp4_layers_take_the_kernel_and_match_their_dequantized_weight(
    rows: int, quant_type: str, double_quant: bool, monkeypatch: pytest.MonkeyPatch
):
    from restora.quant.nf4 import NF4Weight

    q = NF4Weight.quantize(torch.randn(48, 192, generator=torch.Generator().manual_seed(rows)) * 0.05, quant_type, 64,
                           double_quant)
    calls: list[int] = []
    real = ik.int4_amx_mm
    monkeypatch.setattr(ik, "int4_amx_mm", lambda x, *a: calls.append(x.shape[0]) or real(x, *a))
    x = torch.randn(rows, 192, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    with torch.no_grad():
        y = q(x)
    ref = x.double() @ q.dequantize(torch.float32).double().T
    assert calls == ([rows] if _fits(rows) else []) and y.dtype == torch.bfloat16
    # levels rounded to bf16 (2^-9 relative) and one bf16 rounding of the output
    assert (y.double() - ref).abs().max() <= 2 ** -7 * ref.abs().max()


@needs_kernel
def test_new_codes_rebuild_the_kernel_layout():
    q, other = _layer(32, 64, 32, seed=0), _layer(32, 64, 32, seed=1)
    x = torch.randn(4, 64).to(torch.bfloat16)
    with torch.no_grad():
        before = q(x)
        q.load_state_dict(other.state_dict())
        after = q(x)
        assert not torch.equal(before, after)
        assert torch.equal(after, other(x))


@needs_kernel
def test_compiled_graph_calls_the_kernel():
    q = _layer(64, 128, 64)
    x = torch.randn(5, 128).to(torch.bfloat16)
    with torch.no_grad():
        eager = q(x)
        compiled = torch.compile(lambda t: q(t) * 2, fullgraph=True, dynamic=True)(x)
    assert torch.equal(compiled, eager * 2)


def test_disabled_by_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("RESTORA_NATIVE", "0")
    ik._library.cache_clear()
    try:
        assert ik._library() is None
    finally:
        monkeypatch.delenv("RESTORA_NATIVE")
        ik._library.cache_clear()


def test_a_failed_build_warns_and_leaves_torchs_kernel(monkeypatch: pytest.MonkeyPatch, tmp_path):
    if not set(ik.CPU_FLAGS) <= native.cpu_flags():
        pytest.skip("no AVX-512 BF16 CPU: the build is never attempted")
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C\n")
    monkeypatch.setattr(ik, "SOURCE", broken)
    monkeypatch.setenv("RESTORA_CACHE", str(tmp_path / "cache"))
    ik._library.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert ik._library() is None
        assert any("int4 kernel did not build" in str(w.message) for w in caught)
        assert not list((tmp_path / "cache" / "kernels").glob("*.so"))  # no half-written library left behind
    finally:
        monkeypatch.undo()
        ik._library.cache_clear()


def test_the_library_is_built_once_per_source(monkeypatch: pytest.MonkeyPatch, tmp_path):
    if not set(ik.CPU_FLAGS) <= native.cpu_flags():
        pytest.skip("no AVX-512 BF16 CPU: the build is never attempted")
    monkeypatch.setenv("RESTORA_CACHE", str(tmp_path))
    compiler = next(c for c in ("cc", "gcc", "clang") if __import__("shutil").which(c))
    first = native.build(ik.SOURCE, ik.FLAGS, compiler)
    stamp = first.stat().st_mtime_ns
    assert native.build(ik.SOURCE, ik.FLAGS, compiler) == first and first.stat().st_mtime_ns == stamp


@needs_kernel
def test_a_compiled_graph_uses_only_layouts_built_before_it():
    """Building a layout while dynamo traces would change what the guards saw (a recompile per layer), so a graph
    traced without one dequantizes, and `prepare_fast` builds them eagerly for graphs that should use them."""
    q = _layer(64, 128, 64)
    x = torch.randn(5, 128).to(torch.bfloat16)
    torch._dynamo.reset()
    with torch.no_grad():
        y = torch.compile(lambda t: q(t), dynamic=True)(x)
        assert getattr(q, "_amx", None) is None and getattr(q, "_int4pack", None) is None
        assert torch.allclose(y.float(), (x @ q.dequantize(torch.bfloat16).T).float(), atol=2e-2 * y.abs().max().item())
        q.prepare_fast()
        assert q._amx is not None and getattr(q, "_int4pack", None) is None
        torch._dynamo.reset()
        assert torch.equal(torch.compile(lambda t: q(t), dynamic=True)(x), q(x))  # the kernel's own rounding


@needs_kernel
def test_compiled_lean_decoding_prepares_the_layouts():
    from conftest import tiny_llama

    from restora.infer.decode import LeanDecoder
    from restora.quant.quantize import quantize_model
    from restora.quant.nf4 import NF4Weight

    for spec in (QuantSpec("rtn", 4, 32), QuantSpec("nf4", 4, 32)):
        model = tiny_llama()
        quantize_model(model, spec, progress=False)
        weights = [m for m in model.modules() if isinstance(m, (UniformWeight, NF4Weight))]
        LeanDecoder(model, 2, 16, compile=False)
        assert all(getattr(w, "_amx", None) is None for w in weights)
        LeanDecoder(model, 2, 16, compile=True)
        assert weights and all(w._amx is not None for w in weights)
        assert all(getattr(w, "_int4pack", None) is None for w in weights)  # one layout per layer
