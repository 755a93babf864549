"""Adapter folders interoperate with real PEFT in both directions, and bad folders fail clearly.

Interop (@peer, skipped without peft): PEFT loads restora-saved LoRA / rsLoRA / (IA)³ folders
and restora loads PEFT-saved ones, on a tiny Llama (nn.Linear), Qwen2 (biased q/k/v) and GPT-2 (Conv1D),
with the same logits (fp32, atol 1e-5). Bad input: every broken folder gives a one-line error
naming the file and the mismatch, and leaves the model without adapters.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import tiny_llama
from restora.adapters import (
    IA3Config, LoRAConfig, adapter_modules, add_ia3, add_lora, load_adapter, save_adapter,
)

KINDS = ["lora", "rslora", "ia3"]
FAMILIES = ["llama", "qwen2", "gpt2"]  # nn.Linear, nn.Linear with q/k/v biases, Conv1D


def tiny_gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_qwen2(seed: int = 0) -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # random (not zero) q/k/v biases, so output-side (IA)³ vectors meet a bias
        for name, p in model.named_parameters():
            if name.endswith("proj.bias"):
                p.normal_(0, 0.1)
    return model


def tiny(family: str) -> nn.Module:
    return {"llama": tiny_llama, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2}[family](seed=0)


def inputs() -> torch.Tensor:
    return torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def logits(model: nn.Module) -> torch.Tensor:
    return model(inputs()).logits


@torch.no_grad()
def randomize(model: nn.Module) -> None:
    """Non-identity adapter values (B ≠ 0, vectors ≠ 1), in restora or PEFT modules alike."""
    g = torch.Generator().manual_seed(7)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        elif "ia3_l" in name:
            p.copy_(1 + torch.randn(p.shape, generator=g) * 0.3)


def restora_adapter(family: str, kind: str) -> nn.Module:
    model = tiny(family)
    torch.manual_seed(1)
    if kind == "ia3":
        add_ia3(model, IA3Config())
    else:
        add_lora(model, LoRAConfig(r=4, alpha=8, use_rslora=kind == "rslora", target_modules="all"))
    randomize(model)
    return model


def peft_adapter(family: str, kind: str) -> nn.Module:
    from peft import IA3Config as PeftIA3Config
    from peft import LoraConfig, get_peft_model

    model = tiny(family)
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's fan_in_fan_out notice on GPT-2
        if kind == "ia3":
            cfg = PeftIA3Config(task_type="CAUSAL_LM")
        else:
            targets = ["c_attn", "c_fc"] if family == "gpt2" else ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
            cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_rslora=kind == "rslora",
                             fan_in_fan_out=family == "gpt2", task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, cfg)
    randomize(peft_model)
    return peft_model


@pytest.mark.peer
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", KINDS)
def test_peft_loads_restora_adapter(family: str, kind: str, tmp_path: Path) -> None:
    pytest.importorskip("peft")
    from peft import PeftModel

    model = restora_adapter(family, kind)
    folder = save_adapter(model, tmp_path / "a", {"base_model": f"tiny-{family}", "source_hash": "h"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(tiny(family), str(folder))
    assert peft_model.peft_config["default"].peft_type.value == ("IA3" if kind == "ia3" else "LORA")
    ours = logits(model)
    assert not torch.allclose(ours, logits(tiny(family)), atol=1e-3)  # the adapter does something
    torch.testing.assert_close(logits(peft_model), ours, atol=1e-5, rtol=1e-5)


@pytest.mark.peer
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", KINDS)
def test_restora_loads_peft_adapter(family: str, kind: str, tmp_path: Path) -> None:
    pytest.importorskip("peft")
    peft_model = peft_adapter(family, kind)
    peft_model.save_pretrained(str(tmp_path / "p"))
    model = tiny(family)
    info = load_adapter(model, tmp_path / "p")
    assert info.provenance is None and info.kind == ("ia3" if kind == "ia3" else "lora")
    from peft.tuners.tuners_utils import BaseTunerLayer

    assert len(info.paths) == sum(isinstance(m, BaseTunerLayer) for m in peft_model.modules())
    want = logits(peft_model)
    assert not torch.allclose(want, logits(tiny(family)), atol=1e-3)
    torch.testing.assert_close(logits(model), want, atol=1e-5, rtol=1e-5)


# -- bad input ------------------------------------------------------------------------------------


@pytest.fixture
def lora_folder(tmp_path: Path) -> Path:
    model = tiny_llama()
    add_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    return save_adapter(model, tmp_path / "lora", {"base_model": "tiny", "source_hash": "aaa111"})


def edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def edit_weights(folder: Path, fn) -> None:  # noqa: ANN001 - a dict -> dict function
    path = folder / "adapter_model.safetensors"
    save_file(fn(load_file(str(path))), str(path))


def assert_fails_cleanly(folder: Path, match: str, **kwargs) -> None:
    model = tiny_llama()
    with pytest.raises(ValueError, match=match) as err:
        load_adapter(model, folder, **kwargs)
    assert "\n" not in str(err.value)
    assert not list(adapter_modules(model)), "a failed load must leave the model unchanged"


def test_missing_target_module(lora_folder: Path) -> None:
    edit_config(lora_folder, target_modules=["q_proj", "qkv_proj"])
    assert_fails_cleanly(lora_folder, r"adapter_config.json: target 'qkv_proj' matches no linear layer of "
                                      r"LlamaForCausalLM \(available: .*q_proj")


def test_shape_mismatch(lora_folder: Path) -> None:
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    edit_weights(lora_folder, lambda sd: {**sd, key: torch.zeros(4, 32)})
    assert_fails_cleanly(lora_folder, rf"adapter_model.safetensors: shape mismatch for {key}: "
                                      r"file has \(4, 32\), model needs \(4, 64\)")


def test_rank_mismatch_with_config(lora_folder: Path) -> None:
    edit_config(lora_folder, r=8)
    assert_fails_cleanly(lora_folder, r"adapter_model.safetensors: shape mismatch for .*lora_A.weight: "
                                      r"file has \(4, 64\), model needs \(8, 64\)")


def test_unknown_config_fields(lora_folder: Path) -> None:
    edit_config(lora_folder, lora_magic=3, peft_version="0.99", zz_top=True)  # peft_version is harmless
    assert_fails_cleanly(lora_folder, r"adapter_config.json: unknown fields \['lora_magic', 'zz_top'\]")


def test_unsupported_peft_setting(lora_folder: Path) -> None:
    edit_config(lora_folder, use_dora=True)
    assert_fails_cleanly(lora_folder, r"adapter_config.json: unsupported settings use_dora=True")


@pytest.mark.parametrize("field,value,match", [
    ("r", 0, r"adapter_config.json: LoRA r must be a positive integer, got 0"),
    ("r", -2, r"adapter_config.json: LoRA r must be a positive integer, got -2"),
    ("lora_alpha", 0, r"adapter_config.json: LoRA alpha must be positive, got 0"),
    ("lora_alpha", -1.5, r"adapter_config.json: LoRA alpha must be positive, got -1.5"),
    ("peft_type", "PREFIX_TUNING", r"adapter_config.json: peft_type 'PREFIX_TUNING' is not supported"),
    ("bias", "all", r"adapter_config.json: bias='all' is not supported"),
    ("init_lora_weights", "pissa", r"adapter_config.json: init_lora_weights='pissa' is not supported"),
])
def test_bad_config_values(lora_folder: Path, field: str, value: object, match: str) -> None:
    edit_config(lora_folder, **{field: value})
    assert_fails_cleanly(lora_folder, match)


def test_config_not_json(lora_folder: Path) -> None:
    (lora_folder / "adapter_config.json").write_text("{not json")
    assert_fails_cleanly(lora_folder, r"adapter_config.json: not valid JSON")


def test_missing_tensor(lora_folder: Path) -> None:
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    edit_weights(lora_folder, lambda sd: {k: v for k, v in sd.items() if k != key})
    assert_fails_cleanly(lora_folder, rf"adapter_model.safetensors: missing adapter tensor {key}$")


def test_extra_tensor(lora_folder: Path) -> None:
    key = "base_model.model.lm_head.lora_A.weight"
    edit_weights(lora_folder, lambda sd: {**sd, key: torch.zeros(4, 64)})
    assert_fails_cleanly(lora_folder, rf"adapter_model.safetensors: tensor {key} does not belong to any adapter")


def test_non_finite_tensor(lora_folder: Path) -> None:
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    edit_weights(lora_folder, lambda sd: {**sd, key: torch.full_like(sd[key], float("nan"))})
    assert_fails_cleanly(lora_folder, rf"adapter_model.safetensors: tensor {key} holds NaN or infinite values")


def test_source_hash_mismatch(lora_folder: Path) -> None:
    assert_fails_cleanly(lora_folder, r"restora.json: adapter was trained on base aaa111, this base is bbb222",
                         expected_source_hash="bbb222")
    model = tiny_llama()
    with pytest.warns(UserWarning, match=r"aaa111, this base is bbb222 \(loading anyway: force=True\)"):
        info = load_adapter(model, lora_folder, expected_source_hash="bbb222", force=True)
    assert info.provenance["source_hash"] == "aaa111" and len(info.paths) == 4
    assert load_adapter(tiny_llama(), lora_folder, expected_source_hash="aaa111").provenance["base_model"] == "tiny"


def test_loading_onto_adapted_model_is_refused(lora_folder: Path) -> None:
    model = tiny_llama()
    load_adapter(model, lora_folder)
    with pytest.raises(ValueError, match=r"LlamaForCausalLM already has adapters"):
        load_adapter(model, lora_folder)


@pytest.mark.parametrize("kwargs,match", [
    (dict(r=0), r"LoRA r must be a positive integer, got 0"),
    (dict(alpha=0.0), r"LoRA alpha must be positive, got 0.0"),
    (dict(dropout=1.0), r"LoRA dropout must be in \[0, 1\), got 1.0"),
    (dict(init="xavier"), r"LoRA init must be one of default, gaussian, got 'xavier'"),
    (dict(target_modules=[]), r"LoRA target_modules must be non-empty names"),
])
def test_lora_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LoRAConfig(**kwargs)


def test_injection_errors() -> None:
    with pytest.raises(ValueError, match=r"target 'w_q' matches no linear layer of LlamaForCausalLM \(available: "):
        add_lora(tiny_llama(), LoRAConfig(target_modules=["w_q"]))
    with pytest.raises(ValueError, match=r"target regex '.\*wq_proj' matches no linear layer of LlamaForCausalLM"):
        add_lora(tiny_llama(), LoRAConfig(target_modules=r".*wq_proj"))
    model = tiny_llama()
    add_lora(model, LoRAConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"layer model.layers.0.self_attn.q_proj already has an adapter"):
        add_ia3(model, IA3Config(target_modules=r".*q_proj", feedforward_modules=[]))


def test_save_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"LlamaForCausalLM has no adapter to save"):
        save_adapter(tiny_llama(), tmp_path / "x")
    model = tiny_llama()
    add_lora(model, LoRAConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"unknown provenance fields \['seed'\]"):
        save_adapter(model, tmp_path / "x", {"seed": 1})
    assert not (tmp_path / "x").exists()


def test_overwrite_is_atomic_per_file(lora_folder: Path) -> None:
    model = tiny_llama()
    add_ia3(model)
    save_adapter(model, lora_folder)  # replaces the LoRA folder's files
    assert json.loads((lora_folder / "adapter_config.json").read_text())["peft_type"] == "IA3"
    assert not [p for p in lora_folder.parent.iterdir() if ".tmp-" in p.name]
    assert load_adapter(tiny_llama(), lora_folder).kind == "ia3"
