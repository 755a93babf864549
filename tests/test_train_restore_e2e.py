"""End to end through the CLI on a tiny model: train on a k-bit base, resume after a kill,
evaluate at other precisions (PLR), restore and merge into a plain Hugging Face folder."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import kill_at_checkpoint

from restora.cli import main

pytestmark = pytest.mark.smollm  # the tiny model borrows SmolLM2's tokenizer




@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("RESTORA_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


TRAIN = ["--task", "sql", "--max-samples", "32", "--batch-size", "8", "--micro-batch-size", "4",
         "--val-samples", "8", "--lr", "2e-3", "--max-len", "128"]


def test_train_eval_restore_merge(tiny_dir, tmp_path):
    ad = tmp_path / "adapter"
    assert main(["train", str(tiny_dir), "--out", str(ad), "--format", "rtn", "--bits", "3", "--epochs", "2", *TRAIN]) == 0
    prov = json.loads((ad / "restora.json").read_text())
    assert prov["quantization"]["bits"] == 3 and prov["quantization"]["format"] == "rtn"
    assert prov["metrics"]["best_epoch"] in (1, 2) and len(prov["metrics"]["history"]) == 2
    assert (ad / "adapter_config.json").is_file() and (ad / "metrics.jsonl").is_file()
    best = min(h["val_loss"] for h in prov["metrics"]["history"])
    assert prov["metrics"]["best_val_loss"] == best

    # evaluate the 3-bit adapter on its own base and restored to 16 bits
    res = {}
    for bits, fmt in ((3, "rtn"), (16, "float")):
        out = tmp_path / f"eval{bits}.json"
        assert main(["eval", str(tiny_dir), "--adapter", str(ad), "--split", "validation", "--limit", "8",
                     "--format", fmt, "--bits", str(bits), "--max-new-tokens", "4", "--out", str(out)]) == 0
        res[bits] = json.loads(out.read_text())
        assert res[bits]["eval_base"]["bits"] == bits and res[bits]["train_base"]["bits"] == 3
        assert {"exact_match", "execution_match"} <= set(res[bits]["metrics"])
    assert res[3]["log_loss"] != res[16]["log_loss"]  # the base really changed
    # --compile: decoding steps through one compiled graph; the same scoring, recorded in results.json
    out = tmp_path / "eval16c.json"
    assert main(["eval", str(tiny_dir), "--adapter", str(ad), "--split", "validation", "--limit", "8", "--format", "float",
                 "--bits", "16", "--max-new-tokens", "4", "--compile", "--out", str(out)]) == 0
    compiled = json.loads(out.read_text())
    assert compiled["compiled_decoding"] and not res[16]["compiled_decoding"]
    assert compiled["log_loss"] == res[16]["log_loss"] and set(compiled["metrics"]) == set(res[16]["metrics"])
    # --bits without --format: the format restore picks (rtn at 4 here), never silently 16 bits
    out = tmp_path / "eval4.json"
    assert main(["eval", str(tiny_dir), "--adapter", str(ad), "--split", "validation", "--limit", "4",
                 "--bits", "4", "--no-generate", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["eval_base"]["bits"] == 4
    assert json.loads(out.read_text())["eval_base"]["format"] == "rtn"
    assert main(["eval", str(tiny_dir), "--adapter", str(ad), "--format", "float", "--bits", "4"]) == 2
    assert main(["eval", str(tiny_dir), "--bits", "4"]) == 2

    # restore to 16 bits and merge: plain transformers loads it and matches restora's in-memory PLR model
    merged = tmp_path / "merged"
    assert main(["restore", str(ad), "--bits", "16", "--merge", "--out", str(merged)]) == 0
    from transformers import AutoModelForCausalLM

    from restora.restore.plr import restore_base

    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    ours, info = restore_base(ad, 16)
    assert info.restore_spec.is_float and info.train_spec.bits == 3
    ids = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, ours.model(ids).logits, atol=1e-4)

    # --base trained (the dequantized 3-bit base) reproduces the adapter's own training base
    trained, _ = restore_base(ad, 16, base="trained")
    own, _ = restore_base(ad, 3, "rtn")
    with torch.no_grad():
        assert torch.allclose(trained.model(ids).logits, own.model(ids).logits, atol=1e-4)


def test_restore_refuses_other_source(tiny_dir, tmp_path):
    from transformers import LlamaForCausalLM

    ad = tmp_path / "adapter"
    assert main(["train", str(tiny_dir), "--out", str(ad), "--format", "rtn", "--bits", "4", "--max-steps", "1", *TRAIN]) == 0
    other = tmp_path / "other"
    m = LlamaForCausalLM.from_pretrained(tiny_dir)
    with torch.no_grad():
        m.model.layers[0].mlp.up_proj.weight.mul_(1.01)
    m.save_pretrained(other)
    for f in Path(tiny_dir).glob("*token*"):
        (other / f.name).write_bytes(f.read_bytes())
    assert main(["restore", str(ad), "--bits", "16", "--model", str(other), "--out", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r").exists()


def test_bad_batch_settings_are_one_line_errors(tiny_dir, tmp_path, capsys):
    assert main(["train", str(tiny_dir), "--out", str(tmp_path / "a"), "--batch-size", "8", "--micro-batch-size", "3"]) == 2
    assert "micro_batch_size 3 does not divide batch_size 8" in capsys.readouterr().err
    assert main(["train", str(tiny_dir), "--out", str(tmp_path / "a"), "--task", "nope"]) == 2
    assert "unknown task" in capsys.readouterr().err


def test_resume_after_kill_matches_uninterrupted(tiny_dir, tmp_path):
    """Kill a real training process mid-run; --resume must end where an uninterrupted run ends."""
    args = ["train", str(tiny_dir), "--format", "rtn", "--bits", "4", "--max-steps", "6", "--no-bf16", *TRAIN]
    ref = tmp_path / "ref"
    assert main([*args, "--out", str(ref)]) == 0

    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    step_at_kill = kill_at_checkpoint([sys.executable, "-m", "restora.cli", *args, "--out", str(killed)], env, killed)
    assert 2 <= step_at_kill < 6, "the run must be killed mid-training"
    assert main([*args, "--out", str(killed), "--resume"]) == 0
    from safetensors.torch import load_file

    a = load_file(str(ref / "checkpoint" / "state.safetensors"))
    b = load_file(str(killed / "checkpoint" / "state.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k



def test_resume_with_other_settings_names_the_setting(tiny_dir, tmp_path, capsys):
    args = ["train", str(tiny_dir), "--format", "rtn", "--bits", "4", "--max-steps", "1", *TRAIN]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "a"), "--resume", "--seed", "5"]) == 2
    assert "setting seed was 0, now 5" in capsys.readouterr().err


@pytest.mark.parametrize("fmt, bits, extra", [("gptq", 4, ["--calib-samples", "16"]), ("rtn", 2, ["--init", "loftq"])])
def test_own_base_is_rebuilt_exactly(tiny_dir, tmp_path, fmt, bits, extra):
    """Restoring to the training precision reproduces the trained model: same validation loss."""
    from restora.data import encode_rows, split_rows
    from restora.restore.plr import restore_base
    from restora.train.loop import evaluate_loss

    ad = tmp_path / "adapter"
    assert main(["train", str(tiny_dir), "--out", str(ad), "--format", fmt, "--bits", str(bits), "--epochs", "1",
                 *TRAIN, *extra]) == 0
    prov = json.loads((ad / "restora.json").read_text())
    loaded, info = restore_base(ad, bits, fmt)
    assert info.train_spec == info.restore_spec
    val = split_rows("sql", 0).validation[:8]
    enc = encode_rows("sql", loaded.tokenizer, val, 128)
    got = evaluate_loss(loaded.model, enc, loaded.tokenizer.pad_token_id, 4, True)
    assert got == pytest.approx(prov["metrics"]["best_val_loss"], rel=1e-5)
    if "--init" in extra:
        assert (ad / "loftq_init.safetensors").is_file()
