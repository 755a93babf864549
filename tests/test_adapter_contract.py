"""One contract suite over adapter kind × base format.

Every adapter kind (LoRA, rsLoRA, (IA)³, and the batched multi-adapter layer `MultiLoRALinear`
holding a LoRA and an (IA)³ adapter, one per batch row) on every base format (float, nf4, fp4
with and without double quant, int8, RTN 2/3/4/8, GPTQ) of a tiny random Llama must:
  - start as the identity (B = 0, vectors = 1): outputs equal the base's bit for bit
  - merge to the same outputs: within float rounding on a float base; on a quantized base
    exactly what the base's format requantizes the effective weight to, within a few
    quantization errors of the unmerged outputs, with a warning; unmerge restores the base
    exactly; adapters cannot be disabled while merged
  - merge idempotently: merging twice equals merging once
  - save → load exactly (identical logits)
  - train only its own parameters: base weights and buffers are bit-identical after a step
  - survive a base swap (PLR): only the base's contribution changes
  - step aside under disable_adapters: outputs equal the base's bit for bit
A new format or adapter kind gets the whole suite by adding one row. An item that does not
apply to a kind is listed in DOES_NOT_APPLY with the reason, and test_exclusions_hold checks it.
"""

from __future__ import annotations

import copy
import json
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import tiny_llama
from restora.adapters import (
    IA3Config, IA3Linear, LoRAConfig, LoRALinear, MultiLoRALinear, adapter_modules, adapter_state_dict, add_ia3,
    add_lora, disable_adapters, load_adapter, load_adapter_state_dict, load_adapters, save_adapter,
)
from restora.quant import QuantLinear, QuantSpec, quantize_model, quantize_weight, weight_of
from restora.core.modules import set_module

# Single-adapter kinds: how to configure each.
SINGLE = {
    "lora": lambda: LoRAConfig(r=4, alpha=8),
    "rslora": lambda: LoRAConfig(r=4, alpha=8, use_rslora=True, init="gaussian"),
    "ia3": lambda: IA3Config(),
}
# The multi-adapter kind: slot i + 1 of every MultiLoRALinear holds BANK[i]'s adapter and batch row i
# runs that slot, so one batch mixes a LoRA row and an (IA)³ row (inputs() has len(BANK) rows).
BANK = ("lora", "ia3")
KINDS = [*SINGLE, "multi"]
FORMATS = {
    "float": None,
    "nf4": QuantSpec("nf4", 4, 64),
    "fp4": QuantSpec("fp4", 4, 64),
    "fp4-dq": QuantSpec("fp4", 4, 64, double_quant=True),
    "int8": QuantSpec("int8", 8, 64),
    "rtn2": QuantSpec("rtn", 2, 64),
    "rtn3": QuantSpec("rtn", 3, 64),
    "rtn4": QuantSpec("rtn", 4, 64),
    "rtn8": QuantSpec("rtn", 8, 64),
    "gptq": QuantSpec("gptq", 4, 64),
}
# Contract items a kind does not have, and why. Its rows are left out of those items' tests;
# test_exclusions_hold checks each reason.
DOES_NOT_APPLY: dict[str, dict[str, str]] = {
    "multi": {
        "merge": "rows of one batch use different adapters, so no single base weight can hold them: merge() refuses,"
                 " and there is nothing to merge twice, unmerge, or disable while merged",
        "save_load": "a bank holds many adapters, each loaded by name from its own folder, which is saved from a"
                     " single-adapter model (that the bank's rows then equal each folder loaded alone is"
                     " tests/test_multi_adapter.py's mixed-batch test)",
        "train": "it serves, it does not train: the slots are buffers, so it has no parameters of its own",
    },
}


def cases(item: str) -> list:
    """The (kind, format) rows of contract item `item`: every kind on every format, less DOES_NOT_APPLY."""
    return [pytest.param(k, f, id=f"{k}-{f}") for k in KINDS for f in FORMATS if item not in DOES_NOT_APPLY.get(k, {})]

_BASES: dict[str, nn.Module] = {}


def float_model() -> nn.Module:
    if "float" not in _BASES:
        _BASES["float"] = tiny_llama(seed=0)
    return _BASES["float"]


def base_model(fmt: str) -> nn.Module:
    """A fresh copy of the tiny Llama quantized to `fmt` (quantized once per test run)."""
    if fmt not in _BASES:
        spec = FORMATS[fmt]
        model = copy.deepcopy(float_model())
        if fmt == "gptq":
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
    """Add a fresh single adapter of `kind` (seeded)."""
    torch.manual_seed(0)
    cfg = SINGLE[kind]()
    return add_ia3(model, cfg) if isinstance(cfg, IA3Config) else add_lora(model, cfg)


def attach_bank(model: nn.Module, fmt: str, trained: bool) -> None:
    """Wrap `model`'s layers in MultiLoRALinear holding BANK's adapters as `adapted` makes them on `fmt`
    (saved, then loaded by name as a server does); batch row i runs BANK[i]'s slot."""
    with tempfile.TemporaryDirectory() as tmp:
        folders = {k: save_adapter(adapted(k, fmt, trained), Path(tmp) / k) for k in BANK}
        bank = load_adapters(model, folders)
    bank.set_rows(bank.rows(list(BANK)))


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
    """A fresh `fmt` base with an adapter of `kind`: as initialised, or (trained) moved off the identity."""
    model = base_model(fmt)
    if kind == "multi":
        attach_bank(model, fmt, trained)
        return model
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


@pytest.mark.parametrize("kind,fmt", cases("identity"))
def test_fresh_adapter_is_identity(kind: str, fmt: str) -> None:
    base = base_logits(fmt)
    model = adapted(kind, fmt, trained=False)
    assert torch.equal(logits(model), base)


@pytest.mark.parametrize("kind,fmt", cases("merge"))
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
        with pytest.warns(UserWarning, match="requantizes the weight, which rounds") as record:
            for m in layers:
                m.merge()
        assert {w.filename for w in record} == {__file__}  # the warning names the line that called merge()
        for m, (w, _) in zip(layers, expected):
            assert isinstance(m.base_layer, QuantLinear)
            spec = m.base_layer.requantize_spec()
            assert spec == m._unmerged[0].requantize_spec()  # the same format settings
            assert spec.format == ("rtn" if fmt == "gptq" else FORMATS[fmt].format)  # no calibration data: RTN
            want = quantize_weight(w, spec).dequantize()
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


@pytest.mark.parametrize("kind,fmt", cases("merge"))
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


@pytest.mark.parametrize("kind,fmt", cases("merge"))
def test_merged_adapters_cannot_be_disabled(kind: str, fmt: str) -> None:
    model = adapted(kind, fmt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        next(m for _, m in adapter_modules(model)).merge()
    with pytest.raises(ValueError, match="cannot disable merged adapters .*call unmerge"):
        with disable_adapters(model):
            pass


@pytest.mark.parametrize("kind,fmt", cases("save_load"))
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


@pytest.mark.parametrize("kind,fmt", cases("train"))
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


def base_scales(m: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(l_in, l_out) with m(x) = l_out ⊙ base(l_in ⊙ x) + a term without the base; None for a vector of ones.

    LoRA adds its update beside the base; (IA)³ scales its input (feedforward) or output; a
    MultiLoRALinear does both, row b by its own slot's vectors."""
    if isinstance(m, IA3Linear):
        l = m.ia3_l.detach()
        return (l, None) if m.is_feedforward else (None, l)
    if isinstance(m, MultiLoRALinear):
        per_row = lambda stack: None if stack is None else stack[m.rows][:, None, :]  # noqa: E731 - (B, 1, n)
        return per_row(m.ia3_in), per_row(m.ia3_out)
    return None, None


@pytest.mark.parametrize("kind,fmt", cases("swap_base"))
def test_swap_base_changes_only_the_base_contribution(kind: str, fmt: str) -> None:
    model = adapted(kind, fmt)
    g = torch.Generator().manual_seed(2)
    for path, m in list(adapter_modules(model)):
        params = [(p, p.detach().clone()) for p in m.adapter_params()]
        x = torch.randn(len(BANK), 5, m.in_features, generator=g)  # a bank runs one adapter per row
        with torch.no_grad():
            old_base = m.base_layer
            out_old = m(x)
            new_base = restore_target(fmt, path)
            assert m.swap_base(new_base) is old_base
            out_new = m(x)
            l_in, l_out = base_scales(m)
            xs = x if l_in is None else x * l_in
            want = new_base(xs) - old_base(xs)  # the base's contribution, before any output scaling
            want = want if l_out is None else want * l_out
        assert m.base_layer is new_base
        assert all(q is p and torch.equal(p, v) for (p, v), q in zip(params, m.adapter_params()))
        torch.testing.assert_close(out_new - out_old, want, atol=1e-5, rtol=1e-5)
    if fmt != "float":  # restoring every adapted layer equals adapting a model built with float layers there
        reference = base_model(fmt)
        for path, _ in adapter_modules(model):
            set_module(reference, path, copy.deepcopy(float_model().get_submodule(path)))
        if kind == "multi":  # the same saved adapters, loaded into a bank over the reference
            attach_bank(reference, fmt, trained=True)
        else:
            attach(reference, kind)
            load_adapter_state_dict(reference, adapter_state_dict(model))
        torch.testing.assert_close(logits(model), logits(reference), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind,fmt", cases("disable"))
def test_disable_adapters(kind: str, fmt: str) -> None:
    base = base_logits(fmt)
    model = adapted(kind, fmt)
    adapted_out = logits(model)
    assert not torch.equal(adapted_out, base)
    with disable_adapters(model):
        assert torch.equal(logits(model), base)
    assert torch.equal(logits(model), adapted_out)


def test_exclusions_hold() -> None:
    """Each DOES_NOT_APPLY reason is what the kind does."""
    assert set(DOES_NOT_APPLY) <= set(KINDS)
    items = {"identity", "merge", "save_load", "train", "swap_base", "disable"}
    assert all(set(excluded) <= items for excluded in DOES_NOT_APPLY.values())
    model = adapted("multi", "float")
    layers = [m for _, m in adapter_modules(model)]
    assert layers and all(isinstance(m, MultiLoRALinear) for m in layers)
    before = logits(model)
    for m in layers:  # merge: refused, and nothing changed
        with pytest.raises(ValueError, match="cannot merge a multi-adapter layer: rows use different adapters"):
            m.merge()
        assert not m.merged
    assert torch.equal(logits(model), before)
    with pytest.raises(ValueError, match="holds many adapters: save each one from its own model"):  # save_load
        layers[0].peft_tensors()
    for m in layers:  # train: no parameters of its own, only the base's
        assert m.adapter_params() == [] and not list(m.parameters(recurse=False))


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
