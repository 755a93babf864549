"""GPTQ: beats RTN where inputs are correlated, codes mean what UniformWeight stores, and the
block-by-block model pass quantizes every decoder linear from inputs that went through the
already-quantized earlier blocks."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from restora.quant.gptq import gptq_codes, gptq_quantize, gptq_quantize_model, hessian_of
from restora.quant.linear import QuantLinear
from restora.quant.model import quantizable_layers
from restora.quant.quantize import quantize_model
from restora.quant.spec import QuantSpec
from restora.quant.uniform import UniformWeight, rtn_quantize

SQL = Path("/work/shared/data/sql_create_context/train.jsonl")


def correlated_layer(seed: int = 0, n: int = 512, d_in: int = 128, d_out: int = 48) -> tuple[torch.Tensor, ...]:
    """Inputs X (n, d_in) of rank ~16 plus a little noise, columns of very different scales; W (d_out, d_in)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g) @ torch.randn(16, d_in, generator=g)  # (n, in), rank 16
    x = (x + 0.1 * torch.randn(n, d_in, generator=g)) * torch.linspace(0.2, 3.0, d_in)
    return x, torch.randn(d_out, d_in, generator=g)


def gather(into: list[torch.Tensor]) -> Callable[..., None]:
    """A forward hook appending the layer's input, flattened to (tokens, in), to `into`."""
    return lambda _m, a, _o: into.append(a[0].reshape(-1, a[0].shape[-1]).detach())


def out_err(x: torch.Tensor, w: torch.Tensor, wq: torch.Tensor) -> float:
    return (x @ w.T - x @ wq.T).norm().item()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(bits: int, act_order: bool) -> None:
    x, w = correlated_layer()
    spec = QuantSpec("gptq", bits, 32, act_order=act_order, block_size=48)  # blocks straddle groups
    q = gptq_quantize(w, hessian_of(x), spec)
    r = rtn_quantize(w, bits, 32)
    assert q.meta() == {"format": "gptq", "bits": bits, "group_size": 32, "act_order": act_order}
    e_gptq, e_rtn = out_err(x, w, q.dequantize()), out_err(x, w, r.dequantize())
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [32, -1])
def test_loss_equals_quadratic_error_of_stored_codes(act_order: bool, group_size: int) -> None:
    """With U the Cholesky factor, W − Q = δ U, so Σ δ²/2 = tr((W−Q) H_λ (W−Q)ᵀ)/2 exactly:
    the stored codes are the ones the error feedback was computed from."""
    x, w = correlated_layer(seed=1)
    x[:, 5] = 0  # a dead input
    h = hessian_of(x)
    spec = QuantSpec("gptq", 3, group_size, act_order=act_order, damp=0.05, block_size=40)
    r = gptq_codes(w, h, spec)
    q = UniformWeight.from_codes(r.codes, r.scales, r.zeros, 3, group_size, "gptq", g_idx=r.g_idx)
    wq = q.dequantize()
    assert torch.all(wq[:, 5] == 0)
    hd = h.clone()
    hd[5, 5] = 1.0
    hd.diagonal().add_(0.05 * hd.diagonal().mean())
    w0 = w.clone()
    w0[:, 5] = 0
    e = w0 - wq  # (out, in)
    quad = ((e @ hd) * e).sum().item() / 2
    assert quad == pytest.approx(r.loss, rel=2e-3)


def test_codes_round_trip_through_uniform_weight() -> None:
    x, w = correlated_layer(seed=2)
    spec = QuantSpec("gptq", 3, 32, act_order=True, block_size=64)
    r = gptq_codes(w, hessian_of(x), spec)
    assert torch.equal(r.scales, r.scales.half().float())  # the grid uses the stored fp16 scales
    assert r.g_idx is not None and torch.equal(torch.bincount(r.g_idx.long()), torch.full((4,), 32))
    assert not torch.equal(r.g_idx.long(), torch.arange(128) // 32)  # act-order really permuted
    q = gptq_quantize(w, hessian_of(x), spec)
    g = r.g_idx.long()
    manual = (r.codes - r.zeros[:, g]) * r.scales[:, g]  # (out, in) original order
    assert torch.equal(q.dequantize(), manual)
    again = UniformWeight.empty(48, 128, q.meta())
    again.load_state_dict(q.state_dict())
    assert torch.equal(again.dequantize(), q.dequantize())
    # packed 3-bit codes, fp16 scale + uint8 zero per 32 inputs, int32 g_idx per column over 48 rows
    assert q.bits_per_weight() == pytest.approx(3 + 24 / 32 + 32 / 48)


def test_rejects_mismatched_hessian() -> None:
    with pytest.raises(ValueError, match="hessian shape"):
        gptq_quantize(torch.randn(8, 64), torch.eye(32), QuantSpec("gptq", 4, 32))


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256,
    )
    return LlamaForCausalLM(cfg).eval()


def calib_rows(n: int = 6, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (int(torch.randint(5, 40, (1,), generator=g)),), generator=g) for _ in range(n)]


@pytest.mark.parametrize("act_order", [False, True])
def test_model_end_to_end(act_order: bool) -> None:
    model = tiny_llama()
    ref = copy.deepcopy(model)
    names = quantizable_layers(model)
    spec = QuantSpec("gptq", 4, 32, act_order=act_order)
    out = quantize_model(model, spec, calib_rows(), progress=False)  # dispatches to gptq_quantize_model
    assert out is model and len(names) == 14
    for n in names:
        m = model.get_submodule(n)
        assert isinstance(m, QuantLinear) and m.qweight.meta()["format"] == "gptq", n
    ids = torch.randint(0, 256, (1, 24))
    with torch.no_grad():
        a, b = model(ids).logits, ref(ids).logits
    assert torch.isfinite(a).all() and (a - b).norm() < 0.2 * b.norm()


def test_each_block_sees_inputs_through_quantized_earlier_blocks() -> None:
    """Block 1 of the model pass == gptq_quantize of each block-1 layer alone, with H captured on a
    model whose block 0 is already quantized (also checks stacked q/k/v == one by one)."""
    model, rows = tiny_llama(), calib_rows()
    ref = copy.deepcopy(model)
    spec = QuantSpec("gptq", 3, 32)
    gptq_quantize_model(model, spec, rows, progress=False)

    block0 = [n for n in quantizable_layers(ref) if n.startswith("model.layers.0.")]
    for n in block0:
        parent, _, child = n.rpartition(".")
        setattr(ref.get_submodule(parent), child, copy.deepcopy(model.get_submodule(n)))
    block1 = [n for n in quantizable_layers(ref) if n.startswith("model.layers.1.")]
    xs: dict[str, list[torch.Tensor]] = {n: [] for n in block1}
    hooks = [ref.get_submodule(n).register_forward_hook(gather(xs[n])) for n in block1]
    with torch.no_grad():
        for ids in rows:
            ref(ids.view(1, -1))
    for h in hooks:
        h.remove()
    for n in block1:
        alone = gptq_quantize(ref.get_submodule(n).weight, hessian_of(torch.cat(xs[n])), spec)
        mine = model.get_submodule(n).qweight
        same = (alone.dequantize() == mine.dequantize()).float().mean().item()
        assert same > 0.99, (n, same)


def test_model_rejects_bad_calibration() -> None:
    with pytest.raises(ValueError, match="calibration row 1"):
        gptq_quantize_model(tiny_llama(), QuantSpec("gptq", 4, 32), [torch.arange(5), torch.zeros(2, 3).long()])


@pytest.mark.smollm
def test_smollm_layers_gptq_beats_rtn() -> None:
    from restora.models.load import load_model

    loaded = load_model("smollm2-135m")
    model, tok = loaded.model.eval(), loaded.tokenizer
    rows = [json.loads(line) for line in SQL.open().readlines()[:12]]
    texts = [f"{r['context']}\n{r['question']}\n{r['answer']}" for r in rows]
    names = ["model.layers.2.self_attn.q_proj", "model.layers.7.mlp.down_proj", "model.layers.20.self_attn.o_proj"]
    xs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_hook(gather(xs[n])) for n in names]
    with torch.no_grad():
        for t in texts:
            model(tok(t, return_tensors="pt").input_ids)
    for h in hooks:
        h.remove()
    for n in names:
        x, w = torch.cat(xs[n]), model.get_submodule(n).weight.detach()
        for bits in (4, 3):
            q = gptq_quantize(w, hessian_of(x), QuantSpec("gptq", bits, 64))
            e_gptq, e_rtn = out_err(x, w, q.dequantize()), out_err(x, w, rtn_quantize(w, bits, 64).dequantize())
            assert e_gptq < e_rtn, (n, bits, e_gptq, e_rtn)


def test_past_the_input_budget_the_hessian_accumulates(monkeypatch):
    """Beyond INPUT_BYTES of kept inputs, GPTQ keeps a running Σ XᵀX: the same H up to summation order."""
    import restora.quant.gptq as gptq
    from conftest import tiny_llama

    from restora.quant.quantize import quantize_model
    from restora.quant.spec import QuantSpec

    g = torch.Generator().manual_seed(2)
    rows = [torch.randint(0, 256, (24,), generator=g) for _ in range(6)]
    spec = QuantSpec("gptq", 4, group_size=32)
    exact = quantize_model(tiny_llama(), spec, rows, progress=False)
    seen = []
    real = gptq._InputCollector._start_accumulating

    def spy(self):
        seen.append(True)
        real(self)

    monkeypatch.setattr(gptq, "INPUT_BYTES", 20_000)
    monkeypatch.setattr(gptq._InputCollector, "_start_accumulating", spy)
    streamed = quantize_model(tiny_llama(), spec, rows, progress=False)
    assert seen  # the running sum was used
    a, b = exact.state_dict(), streamed.state_dict()
    differ = sum(int((a[n] != b[n]).sum()) for n in a if n.endswith("qweight"))
    total = sum(a[n].numel() for n in a if n.endswith("qweight"))
    assert differ / total < 0.01  # summation order moves a few codes at most
    h = torch.randn(40, 8, generator=g)
    c = gptq._InputCollector({})
    c.inputs["x"] = [h[:15], h[15:]]
    c._start_accumulating()
    assert torch.allclose(c.hessian("x"), gptq.hessian_of(h), rtol=1e-5, atol=1e-6)
