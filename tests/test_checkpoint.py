"""Quantized checkpoints: save -> load gives identical outputs; bad folders give one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama

from restora.models.load import source_hash
from restora.quant import QuantLinear, QuantSpec, quantize_model
from restora.models.quantized import load_quantized
from restora.quant.checkpoint import check_source_hash, read_manifest, save_quantized


class _Tok:
    """Tokenizer stand-in: the checkpoint only needs save_pretrained; loading uses a real one."""

    def save_pretrained(self, path):
        pass


def _save(tmp_path, spec, model=None):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    model = model or tiny_llama()
    h = source_hash(model)
    quantize_model(model, spec, progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")))
    tok.pad_token = "<unk>"
    out = save_quantized(model, tok, tmp_path / "ckpt", spec, {"source": "tiny", "source_hash": h})
    return model, out, h


@pytest.mark.parametrize(
    "spec",
    [QuantSpec("nf4", 4, double_quant=True), QuantSpec("fp4", 4), QuantSpec("int8", 8), QuantSpec("rtn", 3), QuantSpec("rtn", 2, group_size=-1)],
    ids=lambda s: s.label(),
)
def test_save_load_identical_outputs(tmp_path, spec):
    model, out, h = _save(tmp_path, spec)
    loaded = load_quantized(out)
    ids = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded.model(ids).logits)
    assert loaded.source_hash == h
    assert sum(isinstance(m, QuantLinear) for m in loaded.model.modules()) == 2 * 7
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary folder left behind


def test_manifest_has_provenance_and_sizes(tmp_path):
    _, out, h = _save(tmp_path, QuantSpec("rtn", 4))
    m = read_manifest(out)
    assert m["source_hash"] == h and m["quantization"]["bits"] == 4 and m["restora_version"]
    s = m["sizes"]
    assert s["quantized_linear_bytes"] < s["quantized_linear_bf16_bytes"] / 3


def test_truncated_weights_are_a_clear_error(tmp_path):
    _, out, _ = _save(tmp_path, QuantSpec("rtn", 4))
    f = out / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        load_quantized(out)


def test_missing_weights_are_a_clear_error(tmp_path):
    _, out, _ = _save(tmp_path, QuantSpec("rtn", 4))
    (out / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        load_quantized(out)


def test_missing_manifest_field(tmp_path):
    _, out, _ = _save(tmp_path, QuantSpec("rtn", 4))
    m = json.loads((out / "restora_manifest.json").read_text())
    del m["source_hash"]
    (out / "restora_manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="field 'source_hash' is missing"):
        load_quantized(out)


def test_source_hash_mismatch(tmp_path):
    _, out, h = _save(tmp_path, QuantSpec("rtn", 4))
    other = source_hash(tiny_llama(seed=1))
    with pytest.raises(ValueError, match=f"made from source weights {h}, but the model given has {other}"):
        load_quantized(out, expected_source_hash=other)
    check_source_hash(read_manifest(out), h)


def test_group_size_that_does_not_divide_fails_before_work(tmp_path):
    model = tiny_llama()
    with pytest.raises(ValueError, match="group size 48 does not divide in_features 64"):
        quantize_model(model, QuantSpec("rtn", 4, group_size=48), progress=False)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())  # nothing half-done
