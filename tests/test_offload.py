"""Offloading (restora.models.offload): weights stay in their file and are paged in a block at a time.

- a mapped load gives the same logits and greedy text as a load into memory, offloaded or not;
- after a forward pass the offloaded model's mapping holds fewer resident pages than a plain mapped one's, by
  about its decoder blocks' bytes;
- a model with nothing mapped is refused in one line.
"""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import tiny_llama

from restora.models.load import load_model
from restora.models.offload import is_offloaded, mapped_bytes, offload
from restora.models.bases import BaseChoice, build_base
from restora.quant.spec import QuantSpec

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise paging is Linux's")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from test_stream import _tokenizer

    path = tmp_path_factory.mktemp("offload")
    tiny_llama(num_hidden_layers=4, hidden_size=256, intermediate_size=1024).save_pretrained(path)
    _tokenizer(path)
    return path


def _resident_kb(tensors) -> int:
    """Resident kB of this process's file mappings that hold any of `tensors` (/proc/self/smaps)."""
    ptrs = [t.data_ptr() for t in tensors]
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and ":" not in head[0]:
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                inside = any(lo <= p < hi for p in ptrs)
            elif inside and head[0] == "Rss:":
                total += int(head[1])
    return total


def test_mapped_and_offloaded_models_compute_the_same(folder):
    ids = torch.randint(0, 256, (2, 11))
    plain = load_model(str(folder)).model
    mapped = load_model(str(folder), mapped=True).model
    assert mapped_bytes(plain) == 0 and mapped_bytes(mapped) > 0
    with torch.no_grad():
        expected = plain(ids).logits
        assert torch.equal(mapped(ids).logits, expected)
        offload(mapped)
        assert is_offloaded(mapped)
        assert torch.equal(mapped(ids).logits, expected)
        assert torch.equal(mapped(ids).logits, expected)  # pages read back the same bytes


def test_offloading_drops_the_blocks_pages(folder):
    ids = torch.randint(0, 256, (1, 8))
    for paging in (False, True):
        m = load_model(str(folder), mapped=True).model
        if paging:
            offload(m)
        with torch.no_grad():
            m(ids)
        resident = _resident_kb(list(m.parameters()))
        if not paging:
            kept = resident
    block_kb = mapped_bytes(m) // 1024
    assert kept - resident > 0.7 * block_kb


def test_an_offloaded_quantized_checkpoint_decodes_as_the_resident_one(folder, tmp_path, monkeypatch):
    from restora.infer.generate import greedy_generate

    monkeypatch.setenv("RESTORA_CACHE", str(tmp_path))
    build_base(str(folder), BaseChoice(QuantSpec("int8", 8, group_size=-1)))
    cached = next((tmp_path / "bases").iterdir())
    resident = load_model(str(cached))
    paged = load_model(str(cached), mapped=True)
    offload(paged.model)
    prompts = ["w1 w2 w3", "w7 w8"]
    assert greedy_generate(paged.model, paged.tokenizer, prompts, max_new_tokens=6) == \
        greedy_generate(resident.model, resident.tokenizer, prompts, max_new_tokens=6)


def test_offloading_needs_a_mapped_model(folder):
    with pytest.raises(ValueError, match="mapped from the file"):
        offload(load_model(str(folder)).model)


def test_decoding_an_offloaded_model_pages_its_blocks_out(folder):
    """greedy_generate decodes an offloaded model through its modules (whose hooks page), not the lean forward."""
    from restora.core.modules import decoder_blocks
    from restora.infer.generate import greedy_generate

    loaded = load_model(str(folder), mapped=True)
    offload(loaded.model)
    greedy_generate(loaded.model, loaded.tokenizer, ["w1 w2 w3"], max_new_tokens=4)
    blocks = [t for b in decoder_blocks(loaded.model) for t in b.parameters()]
    assert _resident_kb(blocks[:1]) < 0.3 * mapped_bytes(loaded.model) // 1024
