"""The loftq restoration mode: identity at l = k, the LoftQ target at l bits when the
adapter never trained, exact rank-3r bookkeeping, and a clear error for non-LoftQ adapters."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from restora.adapters import load_adapter, save_adapter
from restora.adapters.lora import adapter_modules
from restora.cli import main
from restora.restore.modes import RestorationMode, restore_with_mode
from restora.restore.plr import restore_base

pytestmark = pytest.mark.smollm  # the tiny model borrows SmolLM2's tokenizer

IDS = torch.tensor([[5, 17, 300, 42, 7, 99, 1000, 3]])


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import os

    from conftest import make_tiny_llama_dir

    base = tmp_path_factory.getbasetemp()
    os.environ["RESTORA_CACHE"] = str(base / "cache")
    return make_tiny_llama_dir(base / "tiny4lq", num_hidden_layers=4)


def _train(tiny, out, *extra):
    assert main(["train", str(tiny), "--out", str(out), "--format", "rtn", "--bits", "3", "--max-steps", "2",
                 "--task", "sql", "--max-samples", "16", "--batch-size", "8", "--micro-batch-size", "8",
                 "--val-samples", "8", "--lr", "5e-3", "--max-len", "96", "--targets", "attn", *extra]) == 0
    return out


@pytest.fixture(scope="module")
def loftq_adapter(tiny, tmp_path_factory):
    return _train(tiny, tmp_path_factory.mktemp("lq") / "ad", "--init", "loftq")


@pytest.fixture(scope="module")
def untrained(loftq_adapter, tmp_path_factory):
    """The same adapter with its weights set back to LoftQ's init (same PEFT key names)."""
    d = tmp_path_factory.mktemp("lq0") / "ad"
    shutil.copytree(loftq_adapter, d, ignore=shutil.ignore_patterns("checkpoint"))
    shutil.copy(d / "loftq_init.safetensors", d / "adapter_model.safetensors")
    return d


def test_identity_at_train_bits(loftq_adapter):
    own, _ = restore_base(loftq_adapter, 3, "rtn")
    got, _, rec = restore_with_mode(loftq_adapter, 3, RestorationMode("loftq"), "rtn")
    assert rec["mode"] == "loftq" and torch.equal(_logits(own.model), _logits(got.model))


@pytest.mark.parametrize("bits", [4, 8])
def test_untrained_adapter_gives_the_loftq_target_at_l_bits(untrained, tiny, bits):
    from restora.models.bases import build_loftq_base
    from restora.quant.spec import QuantSpec
    from restora.restore.plr import restore_spec

    got, info, rec = restore_with_mode(untrained, bits, RestorationMode("loftq"), "rtn")
    prov = json.loads((untrained / "restora.json").read_text())
    spec = restore_spec(QuantSpec("rtn", 3, prov["quantization"]["group_size"]), bits, "rtn")
    assert info.restore_spec == spec
    a = prov["adapter"]
    target = build_loftq_base(str(tiny), spec, a["r"], a["alpha"], a["use_rslora"], a["targets"], 5)
    load_adapter(target.model, untrained)
    with torch.no_grad():
        for name, res in target.loftq.items():  # the l-bit LoftQ init as the adapter
            layer = target.model.get_submodule(name)
            layer.lora_A.weight.copy_(res.lora_A)
            layer.lora_B.weight.copy_(res.lora_B)
    assert rec["rank"] == 3 * a["r"]
    torch.testing.assert_close(_logits(got.model), _logits(target.model), rtol=1e-4, atol=1e-4)


def test_untrained_adapter_at_16_bits_is_the_source_model(untrained, tiny):
    from transformers import AutoModelForCausalLM

    got, _, rec = restore_with_mode(untrained, 16, RestorationMode("loftq"))
    r = json.loads((untrained / "restora.json").read_text())["adapter"]["r"]
    assert rec["rank"] == 2 * r  # [A; A0] and [B, -B0]: no l-bit fit at 16 bits
    src = AutoModelForCausalLM.from_pretrained(str(tiny), torch_dtype=torch.float32)
    torch.testing.assert_close(_logits(got.model), _logits(src), rtol=1e-4, atol=1e-4)


def test_trained_update_is_kept_exactly_and_saves(loftq_adapter, tmp_path):
    from safetensors.torch import load_file

    got, _, _ = restore_with_mode(loftq_adapter, 16, RestorationMode("loftq"))
    trained = load_file(str(loftq_adapter / "adapter_model.safetensors"))
    init = load_file(str(loftq_adapter / "loftq_init.safetensors"))
    for name, m in adapter_modules(got.model):
        key = f"base_model.model.{name}.lora_"
        want = m.scaling * (trained[key + "B.weight"] @ trained[key + "A.weight"] - init[key + "B.weight"] @ init[key + "A.weight"])
        torch.testing.assert_close(m.delta_weight(), want, rtol=1e-5, atol=1e-6)
    # a saved restored adapter (rank 2r, rescaled alpha) reloads to the same model
    save_adapter(got.model, tmp_path / "saved", {"base_model": got.source, "source_hash": got.source_hash})
    again, _ = restore_base(tmp_path / "saved", 16)
    torch.testing.assert_close(_logits(again.model), _logits(got.model), rtol=1e-5, atol=1e-5)


def test_auto_considers_loftq_for_loftq_adapters(loftq_adapter):
    _, _, rec = restore_with_mode(loftq_adapter, 16, RestorationMode("auto", calib_rows=4, val_rows=8, auto_bits=(16,)))
    names = [e["candidate"] for e in rec["evidence"]]
    assert "loftq 16" in names
    assert rec["val_loss"] == min(e["val_loss"] for e in rec["evidence"])


def test_non_loftq_adapter_is_refused(tiny, tmp_path):
    ad = _train(tiny, tmp_path / "plain")
    with pytest.raises(ValueError, match="needs an adapter trained with --init loftq"):
        restore_with_mode(ad, 16, RestorationMode("loftq"))
    (ad / "restora.json").write_text((ad / "restora.json").read_text().replace('"init": "default"', '"init": "loftq"'))
    with pytest.raises(FileNotFoundError, match="loftq_init.safetensors does not exist"):
        restore_with_mode(ad, 16, RestorationMode("loftq"))


def test_generate_cli_uses_the_restore_mode(loftq_adapter, tiny, capsys):
    from restora.infer.generate import greedy_generate

    capsys.readouterr()
    assert main(["generate", str(tiny), "--adapter", str(loftq_adapter), "--bits", "16", "--restore-mode", "loftq",
                 "--prompt", "SELECT name FROM", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr()
    got, _, _ = restore_with_mode(loftq_adapter, 16, RestorationMode("loftq"))
    want = greedy_generate(got.model, got.tokenizer, ["SELECT name FROM"], max_new_tokens=4, bf16=False)[0]
    assert out.out.strip() == want.strip() and '"mode": "loftq"' in out.err
    assert main(["generate", str(tiny), "--restore-mode", "loftq", "--prompt", "x"]) != 0
    assert "--restore-mode loftq needs --adapter and --bits" in capsys.readouterr().err
