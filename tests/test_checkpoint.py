"""Quantized checkpoints: save -> load gives identical outputs; bad folders give one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama

from restora.models.load import source_hash
from restora.quant import QuantLinear, QuantSpec, quantize_model
from restora.models.quantized import load_quantized
from restora.quant.checkpoint import check_source_hash, read_manifest, save_quantized, verify_files
from restora.cli import main as cli


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
    with pytest.raises(ValueError, match="model.safetensors: 56148 bytes, the manifest records 112296: truncated"):
        load_quantized(out)
    m = json.loads((out / "restora_manifest.json").read_text())
    del m["files"]  # a manifest without checksums: the reader of the file still refuses it in one line
    (out / "restora_manifest.json").write_text(json.dumps(m))
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


def _manifest(out):
    return json.loads((out / "restora_manifest.json").read_text())


def _rewrite(out, m):
    (out / "restora_manifest.json").write_text(json.dumps(m))


def test_manifest_records_size_and_sha256_of_every_file(tmp_path):
    import hashlib

    _, out, _ = _save(tmp_path, QuantSpec("rtn", 4))
    files = _manifest(out)["files"]
    on_disk = sorted(p.name for p in out.iterdir() if p.name != "restora_manifest.json")
    assert sorted(files) == on_disk and "model.safetensors" in files and "config.json" in files
    for name, rec in files.items():
        data = (out / name).read_bytes()
        assert rec == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert verify_files(out) == len(files)


def test_info_verifies_files(tmp_path, capsys):
    _, out, _ = _save(tmp_path, QuantSpec("rtn", 4))
    assert cli(["info", str(out)]) == 0
    assert "verified (sizes and sha256 match the manifest)" in capsys.readouterr().out
    f = out / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF  # same size, one byte changed: only the checksum sees it
    f.write_bytes(bytes(data))
    assert cli(["info", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.safetensors: sha256" in err and "the manifest records" in err
    f.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    assert cli(["info", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.safetensors: 56148 bytes, the manifest records 112296" in err


def test_checkpoint_without_checksums_still_loads_and_info_says_so(tmp_path, capsys):
    model, out, _ = _save(tmp_path, QuantSpec("rtn", 4))
    m = _manifest(out)
    del m["files"]  # as written by a restora that recorded no checksums
    _rewrite(out, m)
    loaded = load_quantized(out)
    ids = torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded.model(ids).logits)
    assert cli(["info", str(out)]) == 0
    assert "no checksums recorded" in capsys.readouterr().out
    f = out / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])  # truncated: still caught, from the file's own header
    assert cli(["info", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.safetensors: not a safetensors file" in err


def test_layer_without_out_features_is_a_clear_error(tmp_path):
    _, out, _ = _save(tmp_path, QuantSpec("rtn", 4))
    m = _manifest(out)
    name = next(iter(m["layers"]))
    del m["layers"][name]["out_features"]
    _rewrite(out, m)
    with pytest.raises(ValueError, match=f"restora_manifest.json: layer {name}: field 'out_features' is missing or "
                                         "not an integer"):
        load_quantized(out)


def test_kill_during_checkpoint_write_keeps_a_whole_checkpoint(tmp_path):
    """A checkpoint rewritten in place and killed at every step: the folder always loads, old or new."""
    import os
    import signal

    from restora.core.atomic import KILL_AT_ENV

    spec = QuantSpec("rtn", 4)
    first, out, h = _save(tmp_path, spec)
    tok = load_quantized(out).tokenizer
    second = tiny_llama(seed=1)
    quantize_model(second, spec, progress=False)
    ids = torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        want = {"old": first(ids).logits, "new": second(ids).logits}
    seen = set()
    for k in range(1, 30):
        pid = os.fork()
        if pid == 0:  # the writer: SIGKILLs itself at its k-th step
            os.environ[KILL_AT_ENV] = str(k)
            try:
                save_quantized(second, tok, out, spec, {"source": "tiny", "source_hash": h})
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        loaded = load_quantized(out)
        verify_files(out)
        with torch.no_grad():
            got = loaded.model(ids).logits
        which = [v for v, logits in want.items() if torch.equal(got, logits)]
        assert len(which) == 1, f"kill at step {k}: neither the old nor the new checkpoint"
        seen.add(which[0])
        if not killed:
            assert which == ["new"]
            break
        if which == ["new"]:  # put the old one back for the next k
            _save(tmp_path, spec)
    else:
        raise AssertionError("the writer never finished")
    assert seen == {"old", "new"} and not list(tmp_path.glob(".ckpt.*"))
