"""`restora export`: folders vLLM and SGLang serve.

--to peft: real PEFT loads the folder on the base its config names, with restora's PLR16
logits (@peer); the config holds only PEFT LoraConfig fields, leaf target names and the source
model. --to merged-hf: plain transformers loads the folder with the logits of restora's
model + adapter at l bits (16, the trained 4-bit base, a bias-corrected 16-bit base, and an
(IA)³ adapter). Refusals: missing folder, not a PEFT folder, OUT exists, unknown --to,
(IA)³ / DoRA / rank > 512 for vLLM, restore options with --to peft; each one line, exit 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from restora.adapters import IA3Config, LoRAConfig, add_ia3, add_lora, save_adapter
from restora.cli import main
from restora.models.load import load_model
from restora.quant import QuantSpec, quantize_model
from restora.restore.plr import restore_base

IDS = torch.tensor([[5, 17, 300, 42, 7, 99, 1000, 3], [1, 2, 3, 4, 5, 6, 7, 8]])
TRAIN = QuantSpec("rtn", 4, group_size=64)


@pytest.fixture
def cache(tiny_dir, tmp_path, monkeypatch):
    """Quantized bases go to a temporary cache (after tiny_dir, which reads SmolLM2's tokenizer from the real one)."""
    monkeypatch.setenv("RESTORA_CACHE", str(tmp_path / "cache"))
    return tiny_dir


def make_adapter(base_dir: Path, out: Path, kind: str = "lora", targets: str = "all", r: int = 4,
                 quantized: bool = True) -> Path:
    """An adapter 'trained' on the rtn-4 base of `base_dir`: random non-zero factors, restora provenance."""
    loaded = load_model(str(base_dir))
    m = loaded.model
    if quantized:
        quantize_model(m, TRAIN)
    torch.manual_seed(1)
    if kind == "ia3":
        add_ia3(m, IA3Config())
    else:
        add_lora(m, LoRAConfig(r=r, alpha=2 * r, target_modules=targets))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif "ia3_l" in name:
                p.copy_(1 + torch.randn(p.shape, generator=g) * 0.3)
    prov = {"base_model": str(base_dir), "source_hash": loaded.source_hash,
            "quantization": TRAIN if quantized else QuantSpec("float", 16)}
    return save_adapter(m, out, prov)


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model(IDS).logits.float()


def restora_logits(adapter: Path, bits: int) -> torch.Tensor:
    loaded, _ = restore_base(adapter, bits)
    return logits(loaded.model)


def run(capsys, *argv: str) -> tuple[int, str]:
    """Exit code and the error message(s) the CLI printed (progress bars aside)."""
    capsys.readouterr()
    code = main(["export", *map(str, argv)])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("restora: error")]
    return code, "\n".join(errors)


# --- --to peft ------------------------------------------------------------------------------------

@pytest.mark.smollm
@pytest.mark.peer
@pytest.mark.parametrize("targets", ["all", r"model\.layers\.0\.self_attn\.(q|v)_proj"])
def test_peft_loads_export_with_identical_logits(cache, tmp_path, capsys, targets):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(cache, tmp_path / "ad", targets=targets)
    out = tmp_path / "peft"
    assert run(capsys, adapter, "--to", "peft", out) == (0, "")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(Path(cache).resolve())  # the 16-bit source, not the 4-bit base
    assert set(cfg) <= set(peft.LoraConfig.__dataclass_fields__)  # nothing restora-only
    assert cfg["target_modules"] == (["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
                                     if targets == "all" else ["q_proj", "v_proj"])
    prov = json.loads((out / "restora.json").read_text())
    assert prov["quantization"]["bits"] == 4 and prov["notes"]["export"]["to"] == "peft"

    base = AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"], dtype=torch.float32).eval()
    model = peft.PeftModel.from_pretrained(base, out).eval()
    ref = restora_logits(adapter, 16)
    assert torch.allclose(logits(model), ref, atol=1e-5)
    with model.disable_adapter():
        assert not torch.allclose(logits(model), ref, atol=1e-3)  # the adapter matters


@pytest.mark.smollm
def test_peft_export_restora_round_trip_and_plain_peft_input(cache, tmp_path, capsys):
    """restora loads its export again (same PLR16 logits); a folder without restora.json needs --model."""
    adapter = make_adapter(cache, tmp_path / "ad")
    out = tmp_path / "peft"
    assert run(capsys, adapter, "--to", "peft", out)[0] == 0
    assert torch.allclose(restora_logits(out, 16), restora_logits(adapter, 16), atol=1e-6)
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (plain / name).write_bytes((adapter / name).read_bytes())
    code, err = run(capsys, plain, "--to", "peft", tmp_path / "p2")
    assert code == 2 and "--model" in err and "\n" not in err
    assert run(capsys, plain, "--to", "peft", tmp_path / "p2", "--model", cache)[0] == 0
    assert torch.allclose(restora_logits(tmp_path / "p2", 16), restora_logits(adapter, 16), atol=1e-6)


@pytest.mark.smollm
def test_alias_names_the_converted_folder():
    from restora.restore.export import served_source
    from restora.models.load import resolve_source

    assert served_source("smollm2-135m") == str(resolve_source("smollm2-135m").resolve())
    assert (Path(served_source("smollm2-135m")) / "config.json").is_file()
    assert served_source("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"  # hub ids pass through


# --- --to merged-hf -------------------------------------------------------------------------------

@pytest.mark.smollm
@pytest.mark.parametrize("bits", [16, 4])
def test_merged_hf_matches_restora_at_l_bits(cache, tmp_path, capsys, bits):
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(cache, tmp_path / "ad")
    out = tmp_path / f"merged{bits}"
    assert run(capsys, adapter, "--to", "merged-hf", out, "--bits", bits, "--dtype", "float32") == (0, "")
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    m = AutoModelForCausalLM.from_pretrained(out).eval()
    assert m.dtype == torch.float32
    ref = restora_logits(adapter, bits)
    assert torch.allclose(logits(m), ref, atol=1e-4)
    other = restora_logits(adapter, 4 if bits == 16 else 16)
    assert not torch.allclose(logits(m), other, atol=1e-3)  # the restore level is what was asked for
    record = json.loads((out / "restora_export.json").read_text())
    assert record["restore"]["bits"] == bits and record["trained_on"]["bits"] == 4


@pytest.mark.smollm
def test_merged_hf_bfloat16_and_ia3(cache, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(cache, tmp_path / "ia3", kind="ia3", quantized=False)
    out = tmp_path / "merged"
    assert run(capsys, adapter, "--to", "merged-hf", out)[0] == 0  # default dtype bfloat16
    m = AutoModelForCausalLM.from_pretrained(out).eval()
    assert m.dtype == torch.bfloat16
    ref = restora_logits(adapter, 16)
    got = logits(m)
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()  # one bf16 rounding of the merged weights
    code, err = run(capsys, adapter, "--to", "peft", tmp_path / "p")
    assert code == 2 and "(IA)³" in err and "merged-hf" in err and not (tmp_path / "p").exists()


@pytest.mark.smollm
def test_merged_hf_bias_corrected_loads_plainly(cache, tmp_path, capsys):
    """Bias correction adds biases a Llama config does not declare; the export declares them."""
    from transformers import AutoModelForCausalLM

    from restora.restore.modes import RestorationMode, restore_with_mode

    adapter = make_adapter(cache, tmp_path / "ad")
    out = tmp_path / "merged"
    assert run(capsys, adapter, "--to", "merged-hf", out, "--dtype", "float32", "--restore-mode", "bias-correct",
               "--calib-rows", 2)[0] == 0
    m = AutoModelForCausalLM.from_pretrained(out).eval()
    assert m.config.attention_bias and m.config.mlp_bias
    ref, _, _ = restore_with_mode(adapter, 16, RestorationMode("bias-correct", calib_rows=2))
    assert torch.allclose(logits(m), logits(ref.model), atol=1e-4)
    assert not torch.allclose(logits(m), restora_logits(adapter, 16), atol=1e-4)  # the biases are in


# --- refusals ------------------------------------------------------------------------------------

def test_missing_not_peft_unknown_target(tmp_path, capsys):
    code, err = run(capsys, tmp_path / "nope", "--to", "peft", tmp_path / "out")
    assert code == 2 and "nope" in err and "no such adapter folder" in err
    (tmp_path / "empty").mkdir()
    code, err = run(capsys, tmp_path / "empty", "--to", "peft", tmp_path / "out")
    assert code == 2 and "adapter_config.json" in err and "not an adapter folder" in err
    code, err = run(capsys, tmp_path / "empty", "--to", "gguf", tmp_path / "out")
    assert code == 2 and "'gguf'" in err and "peft or merged-hf" in err
    assert "\n" not in err
    assert not (tmp_path / "out").exists()


def test_refusals_before_loading_a_model(tmp_path, capsys):
    """Bad folders and options fail on the files alone (no base model is needed to refuse them)."""
    from safetensors.torch import save_file

    ad = tmp_path / "ad"
    ad.mkdir()
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "base_model_name_or_path": "x"}
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({"base_model.model.q_proj.lora_A.weight": torch.zeros(4, 8)}, str(ad / "adapter_model.safetensors"))
    out = tmp_path / "out"
    out.mkdir()
    code, err = run(capsys, ad, "--to", "peft", out)
    assert code == 2 and str(out) in err and "--overwrite" in err
    code, err = run(capsys, ad, "--to", "peft", tmp_path / "o2", "--bits", 4, "--restore-mode", "bias-correct")
    assert code == 2 and "--bits --restore-mode only apply to --to merged-hf" in err
    code, err = run(capsys, ad, "--to", "peft", ad, "--overwrite")
    assert code == 2 and "adapter folder itself" in err
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    code, err = run(capsys, ad, "--to", "peft", tmp_path / "o3")
    assert code == 2 and "use_dora=True" in err and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad", "out"]  # nothing else written


def test_check_servable_names_the_value(tmp_path):
    from restora.restore.export import check_servable

    ok = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"], "bias": "none"}
    check_servable(ok, tmp_path)
    for bad, needle in [({"peft_type": "IA3"}, "'IA3'"), ({"bias": "all"}, "bias='all'"),
                        ({"use_dora": True}, "use_dora=True"), ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
                        ({"r": 1024}, "r=1024"), ({"target_modules": "q_proj|v_proj"}, "target_modules"),
                        ({"target_modules": ["mlp.c_proj"]}, "leaf"), ({"restora": 1}, "'restora'")]:
        with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace("|", r"\|")) as e:
            check_servable({**ok, **bad}, tmp_path)
        assert "\n" not in str(e.value) and "adapter_config.json" in str(e.value)


@pytest.mark.smollm
def test_rank_above_vllm_limit_is_refused(cache, tmp_path, capsys):
    adapter = make_adapter(cache, tmp_path / "ad", targets=r"model\.layers\.0\.self_attn\.q_proj", r=520,
                           quantized=False)
    code, err = run(capsys, adapter, "--to", "peft", tmp_path / "out")
    assert code == 2 and "r=520" in err and "512" in err and not (tmp_path / "out").exists()


@pytest.mark.smollm
def test_overwrite_replaces_out(cache, tmp_path, capsys):
    adapter = make_adapter(cache, tmp_path / "ad", quantized=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert run(capsys, adapter, "--to", "peft", out, "--overwrite")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "restora.json"]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary folders left


def _rows(n: int = 6) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(3)
    rows = []
    for i in range(n):
        ids = torch.randint(5, 1000, (10 + 3 * i,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 6 + ids[6:]})
    return rows


@pytest.mark.parametrize("bits,base", [(16, "source"), (4, "trained")])
def test_merged_weights_score_as_the_unmerged_adapter(cache, tmp_path, bits, base):
    """The study's merged arms: W + s·BA formed in float32 scores as the unmerged adapter does (float32, no autocast);
    row_losses' per-row sums add up to evaluate_loss's mean."""
    from restora.experiments.grid import _merged_state
    from restora.train.loss import evaluate_loss, row_losses

    adapter = make_adapter(cache, tmp_path / "a", targets="attn")
    loaded, _ = restore_base(adapter, bits, base=base)
    model = loaded.model.float()
    rows = _rows()
    unmerged = row_losses(model, rows, 0, 4, bf16=False)
    assert [n for _, n in unmerged] == [len(r["input_ids"]) - 6 for r in rows]  # the labelled positions
    mean = sum(s for s, _ in unmerged) / sum(n for _, n in unmerged)
    assert mean == pytest.approx(evaluate_loss(model, rows, 0, 4, bf16=False), rel=1e-5)
    state = _merged_state(model)
    assert not any("lora" in k for k in state)
    merged = row_losses(model, rows, 0, 4, bf16=False)
    assert [s for s, _ in merged] == pytest.approx([s for s, _ in unmerged], rel=1e-4)


@pytest.mark.smollm
def test_merged_hf_default_is_the_studys_choice_and_says_why(cache, tmp_path, capsys):
    from restora.restore.export import DEFAULT_MERGE_MODE

    def run(capsys, *argv):
        capsys.readouterr()
        code = main(["export", *map(str, argv)])
        return code, capsys.readouterr().err

    adapter = make_adapter(cache, tmp_path / "q", targets="attn")
    code, err = run(capsys, adapter, "--to", "merged-hf", tmp_path / "m", "--dtype", "float32")
    assert code == 0
    assert f"restoration: {DEFAULT_MERGE_MODE} at 16 bits (the PLR study (docs/plr-study.md)" in err
    record = json.loads((tmp_path / "m" / "restora_export.json").read_text())
    assert record["restore_mode"] == DEFAULT_MERGE_MODE and "PLR study" in record["why"]
    code, err = run(capsys, adapter, "--to", "merged-hf", tmp_path / "p16", "--bits", 16)
    assert code == 0 and "restoration: plain at 16 bits (as asked)" in err
    float_adapter = make_adapter(cache, tmp_path / "f", targets="attn", quantized=False)
    code, err = run(capsys, float_adapter, "--to", "merged-hf", tmp_path / "f16")
    assert code == 0 and "(the adapter was trained on the 16-bit base)" in err


def test_merged_weights_are_rounded_once(cache, tmp_path):
    """Each merged dtype holds the float32 sum rounded once, whatever dtype the model held before."""
    from restora.experiments.grid import _load_rounded, _merged_state

    loaded, _ = restore_base(make_adapter(cache, tmp_path / "a", targets="attn"), 16)
    exact = _merged_state(loaded.model)
    for before, after in ((torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16)):
        loaded.model.to(before)
        _load_rounded(loaded.model, exact, after)
        for k, v in loaded.model.state_dict().items():
            assert torch.equal(v, exact[k].to(after)), k
