"""Memory-mapped weights: converting or quantizing them drops the file's pages and changes no value."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama

from restora.core.mapped import release, to_dtype
from restora.quant import QuantSpec, quantize_model

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page release is Linux-only")


def _resident_kib(path: Path) -> int:
    """Resident kB of this process's mappings of `path` (from /proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and ":" not in head[0]:
            inside = len(head) > 5 and head[5] == str(path)
        elif inside and head[0] == "Rss:":
            total += int(head[1])
    return total


def _mapped_model(tmp_path: Path, **overrides):
    from transformers import AutoModelForCausalLM

    tiny_llama(intermediate_size=1024, **overrides).save_pretrained(tmp_path)  # 256 KiB MLP weights: whole pages
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    return model, tmp_path / "model.safetensors"


def _touch(model) -> None:
    for p in model.parameters():
        float(p.detach().double().sum())


def test_to_dtype_is_module_to_and_drops_pages(tmp_path):
    model, file = _mapped_model(tmp_path)
    want = tiny_llama(intermediate_size=1024).to(torch.bfloat16).state_dict()
    _touch(model)
    sources = [p.detach() for p in model.parameters()]  # keep the mapping alive: only dropped pages leave RSS
    before = _resident_kib(file)
    assert before > 1024  # the weights really are views of the mapped file
    to_dtype(model, torch.bfloat16)
    got = model.state_dict()
    assert got.keys() == want.keys()
    for k, t in want.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t), k
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert _resident_kib(file) < before / 4
    assert all(torch.equal(s, t) for s, t in zip(sources, tiny_llama(intermediate_size=1024).parameters()))


def test_quantize_model_drops_source_pages_same_codes(tmp_path):
    model, file = _mapped_model(tmp_path)
    reference = tiny_llama(intermediate_size=1024)  # the same weights, in ordinary memory
    spec = QuantSpec("rtn", 4, 32)
    _touch(model)
    before = _resident_kib(file)
    quantize_model(model, spec, progress=False)
    quantize_model(reference, spec, progress=False)
    got, want = model.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for k, t in want.items():
        assert torch.equal(got[k], t), k
    assert _resident_kib(file) < before / 2  # only the embedding and norms may stay resident


def test_release_keeps_values_and_skips_written_or_anonymous_memory(tmp_path):
    data = torch.arange(1 << 18, dtype=torch.float32)  # 1 MiB
    path = tmp_path / "blob.bin"
    path.write_bytes(data.numpy().tobytes())
    mapped = torch.from_file(str(path), shared=False, size=data.numel(), dtype=torch.float32)
    assert torch.equal(mapped, data)
    assert release([mapped]) == 1 << 20  # page-aligned mapping: every page dropped
    assert torch.equal(mapped, data)  # read back from the file
    mapped[5] = -1.0  # a private (copy-on-write) page: dropping it would lose the write
    assert release([mapped]) == 0 and float(mapped[5]) == -1.0
    anon = data.clone()
    assert release([anon]) == 0 and torch.equal(anon, data)
