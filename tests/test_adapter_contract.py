"""One contract suite over adapter kind × base format (STYLE habits 9 and 10).

Every adapter (LoRA, rsLoRA, (IA)³) on every base format (float, nf4, fp4, int8, RTN 2/3/4/8,
GPTQ when restora.quant.gptq exists) of a tiny random Llama must:
  - start as the identity (B = 0, vectors = 1): outputs equal the base's bit for bit
  - merge to the same outputs: within float rounding on a float base; on a quantized base
    exactly what requantizing the effective weight gives, within a few quantization errors
    of the unmerged outputs, with a warning; unmerge restores the base exactly
  - merge idempotently: merging twice equals merging once
  - save → load exactly (identical logits)
  - train only its own parameters: base weights and buffers are bit-identical after a step
  - survive a base swap (PLR): only the base's contribution changes
A new format or adapter kind gets the whole suite by adding one row.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import warnings

import pytest
import torch
from torch import nn

from conftest import tiny_llama
from restora.adapters import (
    IA3Config, IA3Linear, LoRAConfig, LoRALinear, adapter_modules, adapter_state_dict, add_ia3, add_lora,
    disable_adapters, load_adapter, load_adapter_state_dict, save_adapter,
)
from restora.adapters.lora import requantize_spec
from restora.quant import QuantLinear, QuantSpec, quantize_model, quantize_weight, weight_of
from restora.core.modules import set_module

KINDS = {
    "lora": lambda: LoRAConfig(r=4, alpha=8),
    "rslora": lambda: LoRAConfig(r=4, alpha=8, use_rslora=True, init="gaussian"),
    "ia3": lambda: IA3Config(),
}
FORMATS = {
    "float": None,
    "nf4": QuantSpec("nf4", 4, 64),
    "fp4": QuantSpec("fp4", 4, 64, double_quant=True),
    "int8": QuantSpec("int8", 8, 64),
    "rtn2": QuantSpec("rtn", 2, 64),
    "rtn3": QuantSpec("rtn", 3, 64),
    "rtn4": QuantSpec("rtn", 4, 64),
    "rtn8": QuantSpec("rtn", 8, 64),
    "gptq": QuantSpec("gptq", 4, 64),
}
CASES = [(k, f) for k in KINDS for f in FORMATS]
IDS = [f"{k}-{f}" for k, f in CASES]

_BASES: dict[str, nn.Module] = {}


def float_model() -> nn.Module:
    if "float" not in _BASES:
        _BASES["float"] = tiny_llama(seed=0)
    return _BASES["float"]


def base_model(fmt: str) -> nn.Module:
    """A fresh copy of the tiny Llama quantized to `fmt` (quantized once per session)."""
    if fmt not in _BASES:
        spec = FORMATS[fmt]
        model = copy.deepcopy(float_model())
        if fmt == "gptq":
            if importlib.util.find_spec("restora.quant.gptq") is None:
                pytest.skip("restora.quant.gptq is not written yet")
            calib = [torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(i)) for i in range(4)]
            quantize_model(model, spec, calibration=calib, progress=False)
        elif spec is not None:
            quantize_model(model, spec, progress=False)
        _BASES[fmt] = model
    return copy.deepcopy(_BASES[fmt])


_BASE_LOGITS: dict[str, torch.Tensor] = {}


def base_logits(fmt: str) -> torch.Tensor:
    if fmt not in _BASE_LOGITS:
        _BASE_LOGITS[fmt] = logits(base_model(fmt))
    return _BASE_LOGITS[fmt]


def inputs() -> torch.Tensor:
    return torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1))


def attach(model: nn.Module, kind: str) -> list[str]:
    torch.manual_seed(0)
    cfg = KINDS[kind]()
    return add_ia3(model, cfg) if isinstance(cfg, IA3Config) else add_lora(model, cfg)


@torch.no_grad()
def train_like(model: nn.Module, seed: int = 0) -> None:
    """Move the adapters away from their identity init, as training would: a LoRA update
    s·BA of a quarter of the base weight's norm, (IA)³ vectors 1 ± 0.2."""
    g = torch.Generator().manual_seed(seed)
    for _, m in adapter_modules(model):
        if isinstance(m, LoRALinear):
            b = torch.randn(m.lora_B.weight.shape, generator=g)
            delta = m.scaling * b @ m.lora_A.weight  # (out, in)
            m.lora_B.weight.copy_(b * (0.25 * weight_of(m.base_layer).norm() / delta.norm()))
        else:
            m.ia3_l.copy_(1 + torch.randn(m.ia3_l.shape, generator=g) * 0.2)


def adapted(kind: str, fmt: str, trained: bool = True) -> nn.Module:
    model = base_model(fmt)
    attach(model, kind)
    if trained:
        train_like(model)
    return model


@torch.no_grad()
def logits(model: nn.Module) -> torch.Tensor:
    return model(inputs()).logits


@torch.no_grad()
def effective_weight(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) of the affine map an (unmerged) adapter layer computes, read off its outputs only."""
    n_in = layer.in_features
    zero = layer(torch.zeros(1, n_in))[0]
    return (layer(torch.eye(n_in)) - zero).T, zero  # rows of f(I) - f(0) are the columns of W


@pytest.mark.parametrize("kind,fmt", CASES, ids=IDS)
def test_fresh_adapter_is_identity(kind: str, fmt: str) -> None:
    base = base_logits(fmt)
    model = adapted(kind, fmt, trained=False)
    assert torch.equal(logits(model), base)


@pytest.mark.parametrize("kind,fmt", CASES, ids=IDS)
def test_merged_equals_unmerged(kind: str, fmt: str) -> None:
    model = adapted(kind, fmt)
    unmerged = logits(model)
    layers = [m for _, m in adapter_modules(model)]
    expected = [effective_weight(m) for m in layers]
    if fmt == "float":
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # merging onto a float base is exact: no warning
            for m in layers:
                m.merge()
        torch.testing.assert_close(logits(model), unmerged, atol=2e-5, rtol=1e-5)
        for m, (w, _) in zip(layers, expected):
            torch.testing.assert_close(weight_of(m.base_layer), w, atol=1e-6, rtol=1e-5)
    else:
        with pytest.warns(UserWarning, match="requantizes the weight, which rounds"):
            for m in layers:
                m.merge()
        for m, (w, _) in zip(layers, expected):
            assert isinstance(m.base_layer, QuantLinear)
            assert requantize_spec(m.base_layer) == requantize_spec(m._unmerged[0])  # same format settings
            want = quantize_weight(w, requantize_spec(m.base_layer)).dequantize()
            got = weight_of(m.base_layer)
            # the same requantization up to codes flipped by float rounding at a grid boundary
            assert (got - want).abs().gt(1e-6).float().mean() < 1e-3
        merged = logits(model)
        quant_err = (base_logits(fmt) - base_logits("float")).abs().max()
        assert (merged - unmerged).abs().max() <= 3 * quant_err  # rounds about as much as quantizing once
    for m in layers:
        m.unmerge()
    if fmt == "float":
        torch.testing.assert_close(logits(model), unmerged, atol=2e-5, rtol=1e-5)
    else:
        assert torch.equal(logits(model), unmerged)  # the original quantized base comes back


@pytest.mark.parametrize("kind,fmt", CASES, ids=IDS)
def test_merge_twice_equals_merge_once(kind: str, fmt: str) -> None:
    model = adapted(kind, fmt)
    layers = [m for _, m in adapter_modules(model)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for m in layers:
            m.merge()
        once = logits(model)
        weights = [weight_of(m.base_layer) for m in layers]
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a no-op: nothing is requantized again
            for m in layers:
                m.merge()
    assert torch.equal(logits(model), once)
    assert all(torch.equal(weight_of(m.base_layer), w) for m, w in zip(layers, weights))


@pytest.mark.parametrize("kind,fmt", CASES, ids=IDS)
def test_save_load_exact(kind: str, fmt: str, tmp_path) -> None:
    model = adapted(kind, fmt)
    out = save_adapter(model, tmp_path / "adapter", {"base_model": "tiny-llama", "source_hash": "h0"})
    record = json.loads((out / "restora.json").read_text())
    assert record["quantization"]["format"] == ("float" if fmt == "float" else FORMATS[fmt].format)
    assert record["adapter"]["kind"] == ("ia3" if kind == "ia3" else "lora")
    fresh = base_model(fmt)
    info = load_adapter(fresh, out, expected_source_hash="h0")
    assert info.paths == [p for p, _ in adapter_modules(model)]
    assert torch.equal(logits(fresh), logits(model))


@pytest.mark.parametrize("kind,fmt", CASES, ids=IDS)
def test_only_adapter_parameters_train(kind: str, fmt: str) -> None:
    model = adapted(kind, fmt)
    adapter_ids = {id(p) for _, m in adapter_modules(model) for p in m.adapter_params()}
    before = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k and "ia3_l" not in k}
    adapters_before = [p.detach().clone() for _, m in adapter_modules(model) for p in m.adapter_params()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # all of them: frozen ones must not move
    ids = inputs()
    loss = model(ids, labels=ids).loss
    loss.backward()
    with_grad = {id(p) for p in model.parameters() if p.grad is not None}
    assert with_grad == adapter_ids
    assert all(p.grad.abs().sum() > 0 for _, m in adapter_modules(model) for p in m.adapter_params())
    opt.step()
    after = {k: v for k, v in model.state_dict().items() if k in before}
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before), "a base weight or buffer changed"
    adapters_after = [p.detach() for _, m in adapter_modules(model) for p in m.adapter_params()]
    assert all(not torch.equal(a, b) for a, b in zip(adapters_after, adapters_before))


def restore_target(fmt: str, path: str) -> nn.Module:
    """The layer PLR would restore to: the float original, or (under a float adapter) an 8-bit one."""
    original = float_model().get_submodule(path)
    if fmt == "float":
        return QuantLinear.from_linear(original, QuantSpec("rtn", 8, 64))
    return copy.deepcopy(original)


@pytest.mark.parametrize("kind,fmt", CASES, ids=IDS)
def test_swap_base_changes_only_the_base_contribution(kind: str, fmt: str) -> None:
    model = adapted(kind, fmt)
    g = torch.Generator().manual_seed(2)
    for path, m in list(adapter_modules(model)):
        params = [(p, p.detach().clone()) for p in m.adapter_params()]
        x = torch.randn(2, 5, m.in_features, generator=g)
        with torch.no_grad():
            old_base = m.base_layer
            out_old, old_base_out = m(x), old_base(x)
            new_base = restore_target(fmt, path)
            assert m.swap_base(new_base) is old_base
            out_new, new_base_out = m(x), new_base(x)
        assert m.base_layer is new_base
        assert all(q is p and torch.equal(p, v) for (p, v), q in zip(params, m.adapter_params()))
        if isinstance(m, LoRALinear):
            torch.testing.assert_close(out_new - out_old, new_base_out - old_base_out, atol=1e-5, rtol=1e-5)
        elif m.is_feedforward:  # the input-side vector now feeds the new base
            with torch.no_grad():
                torch.testing.assert_close(out_new, new_base(x * m.ia3_l), atol=1e-6, rtol=1e-6)
        else:  # the output-side vector rescales the new base's output: l ⊙ (new - old)
            torch.testing.assert_close(out_new - out_old, (new_base_out - old_base_out) * m.ia3_l.detach(),
                                       atol=1e-5, rtol=1e-5)
    if fmt != "float":  # restoring every adapted layer equals adapting a model built with float layers there
        reference = base_model(fmt)
        for path, _ in adapter_modules(model):
            set_module(reference, path, copy.deepcopy(float_model().get_submodule(path)))
        attach(reference, kind)
        load_adapter_state_dict(reference, adapter_state_dict(model))
        torch.testing.assert_close(logits(model), logits(reference), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind,fmt", CASES, ids=IDS)
def test_disable_adapters(kind: str, fmt: str) -> None:
    base = base_logits(fmt)
    model = adapted(kind, fmt)
    adapted_out = logits(model)
    assert not torch.equal(adapted_out, base)
    with disable_adapters(model):
        assert torch.equal(logits(model), base)
    assert torch.equal(logits(model), adapted_out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        next(m for _, m in adapter_modules(model)).merge()
    with pytest.raises(ValueError, match="cannot disable merged adapters .*call unmerge"):
        with disable_adapters(model):
            pass


# -- things that are not per format ------------------------------------------------------------


def test_lora_init_and_scaling() -> None:
    model = base_model("float")
    paths = add_lora(model, LoRAConfig(r=4, alpha=8, target_modules="attn"))
    assert [p.rsplit(".", 1)[-1] for p in paths[:4]] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert len(paths) == 8
    m = model.get_submodule(paths[0])
    assert m.lora_A.weight.shape == (4, 64) and m.lora_B.weight.shape == (64, 4)
    assert torch.count_nonzero(m.lora_B.weight) == 0
    bound = 1 / 64**0.5  # Kaiming-uniform with a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))
    assert m.lora_A.weight.abs().max() <= bound and m.lora_A.weight.abs().max() > 0.8 * bound
    assert m.scaling == 2.0
    assert LoRAConfig(r=4, alpha=8, use_rslora=True).scaling == 4.0


def test_ia3_vector_shapes_follow_peft() -> None:
    model = base_model("float")
    paths = add_ia3(model)
    assert sorted({p.rsplit(".", 1)[-1] for p in paths}) == ["down_proj", "k_proj", "v_proj"]
    down = model.get_submodule("model.layers.0.mlp.down_proj")
    k = model.get_submodule("model.layers.0.self_attn.k_proj")
    assert isinstance(down, IA3Linear) and down.is_feedforward and down.ia3_l.shape == (128,)
    assert not k.is_feedforward and k.ia3_l.shape == (32,)
    assert down.peft_tensors()["ia3_l"].shape == (1, 128) and k.peft_tensors()["ia3_l"].shape == (32, 1)


def test_merge_onto_float_biased_conv1d_is_exact() -> None:
    """GPT-2's Conv1D stores (in, out) and has a bias; merge must respect both."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(48, 16)
    nn.init.normal_(conv.bias)
    x = torch.randn(3, 16)
    for layer in (LoRALinear(copy.deepcopy(conv), LoRAConfig(r=2, alpha=4)), IA3Linear(copy.deepcopy(conv), False)):
        train_like(nn.ModuleDict({"m": layer}))
        with torch.no_grad():
            before = layer(x)
            layer.merge()
            torch.testing.assert_close(layer(x), before, atol=1e-6, rtol=1e-6)
            layer.unmerge()
            torch.testing.assert_close(layer(x), before, atol=1e-6, rtol=1e-6)


def tiny_family(family: str) -> nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    if family == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64,
                                                bos_token_id=0, eos_token_id=0)).eval()
    config_cls, model_cls = {
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM),
    }[family]
    cfg = config_cls(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    return model_cls(cfg).eval()


@pytest.mark.parametrize("family", ["qwen2", "mistral", "gemma", "gpt2"])
def test_presets_on_model_families(family: str) -> None:
    """all = every decoder linear (MLP included), attn = q/k/v/o, ia3 = k/v/down; fresh adapters are the identity."""
    from restora.adapters import select_targets
    from restora.quant.model import quantizable_layers

    model = tiny_family(family)
    leaves = lambda paths: sorted({p.split(".", 3)[-1] for p in paths})  # noqa: E731 - e.g. self_attn.q_proj
    assert select_targets(model, "all") == quantizable_layers(model)
    if family == "gpt2":
        assert leaves(select_targets(model, "attn")) == ["attn.c_attn", "attn.c_proj"]
        assert leaves(select_targets(model, "ia3")) == ["attn.c_attn", "mlp.c_proj"]
    else:
        assert {p.rsplit(".", 1)[-1] for p in select_targets(model, "attn")} == {"q_proj", "k_proj", "v_proj", "o_proj"}
        assert {p.rsplit(".", 1)[-1] for p in select_targets(model, "ia3")} == {"k_proj", "v_proj", "down_proj"}
    ids = inputs()
    with torch.no_grad():
        base = model(ids).logits
        for add, cfg in ((add_lora, LoRAConfig(r=2, alpha=4)), (add_ia3, IA3Config())):
            m = copy.deepcopy(model)
            add(m, cfg)
            assert torch.equal(m(ids).logits, base)
