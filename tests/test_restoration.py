"""Restoration modes: identity at l = k, bias correction preserves mean outputs,
partial restoration keeps unselected layers at k bits, auto picks the validation minimum."""

from __future__ import annotations

import pytest
import torch

from restora.cli import main
from restora.quant import QuantLinear
from restora.restore.modes import RestorationMode, restore_with_mode
from restora.restore.plr import restore_base

pytestmark = pytest.mark.smollm  # the tiny model borrows SmolLM2's tokenizer


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    from conftest import make_tiny_llama_dir

    base = tmp_path_factory.getbasetemp()
    import os

    os.environ["RESTORA_CACHE"] = str(base / "cache")
    d = make_tiny_llama_dir(base / "tiny4", num_hidden_layers=4)
    ad = base / "ad3"
    assert main(["train", str(d), "--out", str(ad), "--format", "rtn", "--bits", "3", "--max-steps", "3",
                 "--task", "sql", "--max-samples", "24", "--batch-size", "8", "--micro-batch-size", "8",
                 "--val-samples", "8", "--lr", "5e-3", "--max-len", "96", "--targets", "attn"]) == 0
    return ad


IDS = torch.tensor([[5, 17, 300, 42, 7, 99, 1000, 3]])


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("mode", [RestorationMode("bias-correct", calib_rows=4),
                                  RestorationMode("partial", layers="0-1"),
                                  RestorationMode("partial+bias", modules="mlp", calib_rows=4),
                                  RestorationMode("mean-match", calib_rows=4),
                                  RestorationMode("mean-match", modules="attn", calib_rows=4)])
def test_every_mode_is_identity_at_train_bits(adapter, mode):
    own, _ = restore_base(adapter, 3, "rtn")
    got, info, _ = restore_with_mode(adapter, 3, mode, "rtn")
    assert torch.equal(_logits(own.model), _logits(got.model))


def test_bias_correction_preserves_mean_output_of_first_layer(adapter):
    from restora.data import calibration_rows, get_task

    t = get_task("sql")
    texts = [t.text(r) for r in calibration_rows(t, 4, seed=0)]
    own, _ = restore_base(adapter, 3, "rtn")
    fixed, _, rec = restore_with_mode(adapter, 16, RestorationMode("bias-correct", calib_rows=4))
    plain, _ = restore_base(adapter, 16)
    # the first layer's base projection sees the same input in all three models (embeddings + norm)
    name = "model.layers.0.self_attn.q_proj.base_layer"

    def mean_out(model):
        out = []
        h = model.get_submodule(name).register_forward_hook(lambda m, a, o: out.append(o.detach().reshape(-1, o.shape[-1])))
        for text in texts:
            with torch.no_grad():
                model(own.tokenizer(text, return_tensors="pt")["input_ids"])
        h.remove()
        return torch.cat(out).mean(0)

    ref = mean_out(own.model)
    assert torch.allclose(mean_out(fixed.model), ref, atol=1e-5)
    assert not torch.allclose(mean_out(plain.model), ref, atol=1e-5)  # plain PLR moves the mean
    assert rec["restored_layers"] == rec["total_layers"]


def test_partial_keeps_unselected_layers_at_k_bits(adapter):
    got, _, rec = restore_with_mode(adapter, 16, RestorationMode("partial", layers="0-1"))
    m = got.model
    for i, layer in enumerate(m.model.layers):
        q = layer.self_attn.q_proj.base_layer
        assert isinstance(q, QuantLinear) == (i >= 2)
        assert isinstance(layer.mlp.down_proj, QuantLinear) == (i >= 2)
    assert rec["restored_layers"] == 14 and rec["total_layers"] == 28


def test_auto_picks_the_validation_minimum(adapter):
    got, info, rec = restore_with_mode(adapter, 16, RestorationMode("auto", calib_rows=4, val_rows=8, min_gain=0))
    losses = [e["val_loss"] for e in rec["evidence"]]
    assert rec["val_loss"] == min(losses)
    keep = next(e for e in rec["evidence"] if e["candidate"] == "keep k-bit base")
    assert rec["val_loss"] <= keep["val_loss"]
    from restora.data import encode_rows, split_rows
    from restora.train.loop import evaluate_loss

    enc = encode_rows("sql", got.tokenizer, split_rows("sql", 0).validation[:8], 512)
    assert evaluate_loss(got.model, enc, got.tokenizer.pad_token_id, 8, True) == pytest.approx(rec["val_loss"], rel=1e-5)


def test_auto_scores_keep_once_over_several_levels(adapter):
    _, _, rec = restore_with_mode(adapter, 16, RestorationMode("auto", calib_rows=4, val_rows=8, min_gain=0,
                                                                auto_bits=(8, 16)))
    names = [e["candidate"] for e in rec["evidence"]]
    assert names.count("keep k-bit base") == 1 and "plain PLR8" in names and "plain PLR16" in names
    assert rec["val_loss"] == min(e["val_loss"] for e in rec["evidence"])


def test_auto_keeps_the_k_bit_base_unless_a_restoration_gains_min_gain(adapter):
    got, _, rec = restore_with_mode(adapter, 16, RestorationMode("auto", calib_rows=4, val_rows=8, min_gain=0.99))
    assert rec["restore_bits"] == 3 and rec["chosen"].startswith("keep k-bit base")
    assert rec["val_loss"] == rec["evidence"][0]["val_loss"]
    own, _ = restore_base(adapter, 3, "rtn")
    assert torch.equal(_logits(got.model), _logits(own.model))
    with pytest.raises(ValueError, match="min_gain must be in"):
        RestorationMode("auto", min_gain=1.5)


def test_cli_offers_exactly_the_library_modes():
    from typing import get_args

    from restora.restore.modes import RestoreModeName
    from restora.restore.modes import MODES

    assert get_args(RestoreModeName) == MODES


def test_bad_mode_is_a_one_line_error():
    with pytest.raises(ValueError, match="restore mode 'magic' is unknown"):
        RestorationMode("magic")
    with pytest.raises(ValueError, match="needs --restore-layers"):
        RestorationMode("partial")


def test_bias_corrected_merge_loads_in_plain_transformers(adapter, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    assert main(["restore", str(adapter), "--bits", "16", "--merge", "--restore-mode", "bias-correct",
                 "--calib-rows", "4", "--out", str(out)]) == 0
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    ours, _, _ = restore_with_mode(adapter, 16, RestorationMode("bias-correct", calib_rows=4))
    assert torch.allclose(_logits(plain), _logits(ours.model), atol=1e-4)


def test_bias_correction_onto_a_quantized_base(adapter):
    """Restoring 3 -> 8 bits with bias correction folds the bias into the QuantLinear bases."""
    got, info, rec = restore_with_mode(adapter, 8, RestorationMode("bias-correct", calib_rows=4), "rtn")
    q = got.model.model.layers[0].mlp.down_proj
    assert isinstance(q, QuantLinear) and q.qweight.bits == 8 and q.bias is not None
    assert "bias" in dict(q.named_buffers())
    assert torch.isfinite(_logits(got.model)).all()


def _calib_texts(n):
    from restora.data import calibration_rows, get_task

    t = get_task("sql")
    return [t.text(r) for r in calibration_rows(t, n, seed=0)]


def _layer_outputs(model, tok, texts, names):
    """Every listed layer's outputs over the real tokens of `texts`, one row at a time (no padding)."""
    outs = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: outs[n].append(o.detach().reshape(-1, o.shape[-1]).double())) for n in names]
    for text in texts:
        with torch.no_grad():
            model(tok(text, return_tensors="pt", truncation=True, max_length=256)["input_ids"])
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in outs.items()}


def test_mean_match_keeps_every_restored_layers_mean_output_along_the_network(adapter):
    """Unlike the first-order bias, mean matching holds in deep layers too, whose inputs drift."""
    from restora.restore.corrections import BiasedLinear

    texts = _calib_texts(4)
    own, _ = restore_base(adapter, 3, "rtn")
    fixed, _, rec = restore_with_mode(adapter, 16, RestorationMode("mean-match", calib_rows=4))
    first, _, _ = restore_with_mode(adapter, 16, RestorationMode("bias-correct", calib_rows=4))
    assert not any(isinstance(m, BiasedLinear) for m in fixed.model.modules())  # folded into the float base
    names = ["model.layers.0.self_attn.q_proj.base_layer", "model.layers.3.self_attn.v_proj.base_layer",
             "model.layers.3.mlp.down_proj"]
    ref = _layer_outputs(own.model, own.tokenizer, texts, names)
    got = _layer_outputs(fixed.model, own.tokenizer, texts, names)
    old = _layer_outputs(first.model, own.tokenizer, texts, names)
    for n in names:
        torch.testing.assert_close(got[n].mean(0), ref[n].mean(0), rtol=0, atol=2e-4)
    deep = names[-1]
    assert (old[deep].mean(0) - ref[deep].mean(0)).abs().max() > 10 * (got[deep].mean(0) - ref[deep].mean(0)).abs().max()
    assert rec["restored_layers"] == rec["total_layers"]


def test_mean_match_on_a_subset_keeps_the_rest_at_k_bits(adapter):
    got, _, rec = restore_with_mode(adapter, 16, RestorationMode("mean-match", layers="2-3", calib_rows=4))
    for i, layer in enumerate(got.model.model.layers):
        assert isinstance(layer.mlp.down_proj, QuantLinear) == (i < 2)
    assert rec["restored_layers"] == 14
