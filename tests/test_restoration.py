"""Restoration modes (issue 8): identity at l = k, bias correction preserves mean outputs,
partial restoration keeps unselected layers at k bits, auto picks the validation minimum."""

from __future__ import annotations

import pytest
import torch

from restora.cli import main
from restora.quant import QuantLinear
from restora.restoration import RestorationMode, restore_with_mode
from restora.restore import restore_base

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
                                  RestorationMode("affine-correct", calib_rows=4)])
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
    got, info, rec = restore_with_mode(adapter, 16, RestorationMode("auto", calib_rows=4, val_rows=8))
    losses = [e["val_loss"] for e in rec["evidence"]]
    assert rec["val_loss"] == min(losses)
    keep = next(e for e in rec["evidence"] if e["candidate"] == "keep k-bit base")
    assert rec["val_loss"] <= keep["val_loss"]
    from restora.data import encode_rows, split_rows
    from restora.train import evaluate_loss

    enc = encode_rows("sql", got.tokenizer, split_rows("sql", 0).validation[:8], 512)
    assert evaluate_loss(got.model, enc, got.tokenizer.pad_token_id, 8, True) == pytest.approx(rec["val_loss"], rel=1e-5)


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


def test_affine_correction_is_the_per_channel_least_squares_fit():
    from restora.restoration import affine_correction

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 24, generator=g, dtype=torch.float64) @ torch.randn(24, 24, generator=g, dtype=torch.float64)
    x = x + torch.randn(24, generator=g, dtype=torch.float64)  # non-zero mean, correlated inputs
    w_l = torch.randn(10, 24, generator=g)
    w_k = w_l + 0.3 * torch.randn(10, 24, generator=g)
    mean, cov = x.mean(0), torch.cov(x.T, correction=0)
    gamma, b = affine_correction(w_k, w_l, mean, cov)
    y_k, y_l = x @ w_k.double().T, x @ w_l.double().T  # (N, out)
    for c in range(10):  # ordinary least squares y_k ~ gamma * y_l + b, channel by channel
        design = torch.stack([y_l[:, c], torch.ones_like(y_l[:, c])], 1)
        sol = torch.linalg.lstsq(design, y_k[:, c:c + 1]).solution[:, 0]
        assert float(gamma[c]) == pytest.approx(float(sol[0]), rel=1e-4)
        assert float(b[c]) == pytest.approx(float(sol[1]), rel=1e-4, abs=1e-4)
    # a pure row scale of the same weights is recovered exactly, with no offset
    gamma, b = affine_correction(torch.diag(torch.linspace(0.5, 2, 10)) @ w_l, w_l, mean, cov)
    torch.testing.assert_close(gamma, torch.linspace(0.5, 2, 10), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b, torch.zeros(10), rtol=0, atol=1e-4)


def test_input_moments_match_the_captured_inputs(adapter):
    from restora.data import calibration_rows, get_task
    from restora.restoration import input_moments, mean_inputs

    t = get_task("sql")
    texts = [t.text(r) for r in calibration_rows(t, 3, seed=0)]
    own, _ = restore_base(adapter, 3, "rtn")
    m, tok = own.model, own.tokenizer
    names = ["model.layers.0.self_attn.q_proj.base_layer", "model.layers.0.self_attn.k_proj.base_layer",
             "model.layers.1.mlp.down_proj"]
    got = input_moments(m, tok, texts, names)
    for n in names:
        xs = []
        h = m.get_submodule(n).register_forward_hook(lambda mod, a, o: xs.append(a[0].detach().reshape(-1, a[0].shape[-1])))
        for text in texts:
            with torch.no_grad():
                m(tok(text, return_tensors="pt", truncation=True, max_length=256)["input_ids"])
        h.remove()
        x = torch.cat(xs).double()
        torch.testing.assert_close(got[n][0], x.mean(0), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got[n][1], torch.cov(x.T, correction=0), rtol=1e-5, atol=1e-7)
    means = mean_inputs(m, tok, texts, names)
    torch.testing.assert_close(got[names[2]][0].float(), means[names[2]], rtol=1e-5, atol=1e-6)


def test_affine_correction_matches_k_bit_first_layer_outputs_and_folds(adapter):
    """On the first layer (same inputs in both models) the affine map keeps the mean output and brings
    the outputs closer to the k-bit layer's than plain PLR; on a float base it folds into the weights."""
    from restora.data import calibration_rows, get_task
    from restora.restoration import BiasedLinear

    t = get_task("sql")
    texts = [t.text(r) for r in calibration_rows(t, 4, seed=0)]
    own, _ = restore_base(adapter, 3, "rtn")
    fixed, _, _ = restore_with_mode(adapter, 16, RestorationMode("affine-correct", calib_rows=4))
    plain, _ = restore_base(adapter, 16)
    assert not any(isinstance(mod, BiasedLinear) for mod in fixed.model.modules())  # folded
    name = "model.layers.0.self_attn.q_proj.base_layer"

    def outputs(model):
        out = []
        h = model.get_submodule(name).register_forward_hook(lambda m, a, o: out.append(o.detach().reshape(-1, o.shape[-1])))
        for text in texts:
            with torch.no_grad():
                model(own.tokenizer(text, return_tensors="pt")["input_ids"])
        h.remove()
        return torch.cat(out)

    ref, got, base = outputs(own.model), outputs(fixed.model), outputs(plain.model)
    torch.testing.assert_close(got.mean(0), ref.mean(0), rtol=0, atol=1e-4)
    assert ((got - ref) ** 2).mean() < ((base - ref) ** 2).mean()
