"""Streaming loads (restora.models.stream): the float model is never whole in memory, and nothing changes.

- a sharded bf16 checkpoint streams into a model equal to transformers' own load, in bf16, head tied;
- the streamed source hash equals `source_hash` of the model loaded whole in fp32 (what adapters recorded);
- while loading and quantizing, at most one decoder block's float linear weights are off meta at once
  (one layer for NF4/FP4/int8/RTN);
- streamed and whole-model quantization give bit-identical tensors for every format, GPTQ included.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
from torch import nn

from restora.core.modules import decoder_blocks
from restora.models.bases import BaseChoice, build_base, stream_quantize
from restora.models.load import load_model, open_source, source_hash
from restora.models.stream import CheckpointFiles, StreamingLoad, empty_model
from restora.quant.linear import QuantLinear
from restora.quant.quantize import quantize_model
from restora.quant.spec import QuantSpec

FORMATS = [
    QuantSpec("nf4", 4, group_size=64, double_quant=True),
    QuantSpec("fp4", 4, group_size=64),
    QuantSpec("int8", 8, group_size=-1),
    QuantSpec("rtn", 3, group_size=32),
    QuantSpec("gptq", 4, group_size=32),
]


def _tokenizer(folder):
    """A small word-level tokenizer saved beside the model, so the tests need no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, 256)}}  # 256 ids, as the tiny models' vocabulary
    t = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", pad_token="[UNK]", eos_token="[UNK]")
    tok.save_pretrained(folder)


@pytest.fixture(scope="module")
def sharded_bf16(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bf16")
    model = tiny_llama(num_hidden_layers=3).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="40KB")  # several shards, an index
    _tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def fp32_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fp32")
    tiny_llama(num_hidden_layers=3, initializer_range=0.2).save_pretrained(folder)  # blocks that matter
    _tokenizer(folder)
    return folder


def test_a_sharded_bf16_checkpoint_round_trips(sharded_bf16):
    assert (sharded_bf16 / "model.safetensors.index.json").is_file()
    assert len(set(CheckpointFiles(sharded_bf16).where.values())) > 2
    streamed = load_model(str(sharded_bf16)).model
    whole = AutoModelForCausalLM.from_pretrained(sharded_bf16, dtype=torch.bfloat16).eval()
    assert {p.dtype for p in streamed.parameters()} == {torch.bfloat16}  # the stored dtype, not fp32
    assert streamed.lm_head.weight is streamed.model.embed_tokens.weight
    for (n, a), (_, b) in zip(sorted(streamed.state_dict().items()), sorted(whole.state_dict().items())):
        assert torch.equal(a, b), n
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, whole(ids).logits)


@pytest.mark.parametrize("which", ["sharded_bf16", "fp32_folder"])
def test_streamed_source_hash_is_the_whole_model_hash(which, request, tmp_path, monkeypatch):
    monkeypatch.setenv("RESTORA_CACHE", str(tmp_path))
    folder = request.getfixturevalue(which)
    whole = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    expected = source_hash(whole)
    source = open_source(str(folder))
    assert source.digest(empty_model(source.config)) == expected
    assert list((tmp_path / "hashes").glob("*.txt"))  # computed once, then read from the cache
    assert load_model(str(folder)).source_hash == expected


def _float_linears_resident(model: nn.Module) -> int:
    return sum(1 for m in decoder_blocks(model).modules()
               if isinstance(m, nn.Linear) and not m.weight.is_meta)


@pytest.mark.parametrize("spec", FORMATS, ids=lambda s: s.label())
def test_at_most_one_block_of_float_weights_is_resident(spec, fp32_folder):
    source = open_source(str(fp32_folder))
    load = StreamingLoad(empty_model(source.config), source.files)
    per_block = sum(1 for m in decoder_blocks(load.model)[0].modules() if isinstance(m, nn.Linear))
    peak = []
    original = load._assign

    def counting(name: str) -> str:
        out = original(name)
        peak.append(_float_linears_resident(load.model))
        return out

    load._assign = counting  # type: ignore[method-assign]
    calibration = [torch.randint(0, 256, (12,)) for _ in range(4)] if spec.format == "gptq" else None
    model = stream_quantize(load, spec, calibration, progress=False)
    assert max(peak) <= (per_block if spec.format == "gptq" else 1)
    assert _float_linears_resident(model) == 0
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 3 * per_block


@pytest.mark.parametrize("spec", FORMATS, ids=lambda s: s.label())
def test_streamed_and_whole_model_quantization_are_identical(spec, fp32_folder, sharded_bf16, tmp_path, monkeypatch):
    monkeypatch.setenv("RESTORA_CACHE", str(tmp_path))
    tok = AutoTokenizer.from_pretrained(fp32_folder)
    calibration = None
    if spec.format == "gptq":
        calibration = [tok(" ".join(f"w{(7 * i + j) % 255 + 1}" for j in range(20)), return_tensors="pt")["input_ids"][0]
                       for i in range(6)]
    for folder, dtype in ((fp32_folder, torch.float32), (sharded_bf16, torch.bfloat16)):
        whole = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        quantize_model(whole, spec, calibration, progress=False)
        source = open_source(str(folder))
        streamed = stream_quantize(source.start(), spec, calibration, progress=False)
        a, b = whole.state_dict(), streamed.state_dict()
        assert a.keys() == b.keys()
        for n in a:
            assert a[n].dtype == b[n].dtype and torch.equal(a[n], b[n]), f"{folder.name} {n}"


def test_build_base_streams_and_caches(fp32_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("RESTORA_CACHE", str(tmp_path))
    spec = QuantSpec("nf4", 4, group_size=64)
    built = build_base(str(fp32_folder), BaseChoice(spec))
    cached = build_base(str(fp32_folder), BaseChoice(spec))  # from the cache: a quantized checkpoint, loaded on meta
    assert built.source_hash == cached.source_hash
    for (n, a), (_, b) in zip(sorted(built.model.state_dict().items()), sorted(cached.model.state_dict().items())):
        assert torch.equal(a, b), n
    assert not any(t.is_meta for t in [*cached.model.parameters(), *cached.model.buffers()])


def test_a_checkpoint_whose_tensors_the_config_lacks_is_a_clear_error(fp32_folder, tmp_path):
    import shutil

    folder = tmp_path / "odd"
    shutil.copytree(fp32_folder, folder)
    (folder / "config.json").write_text((folder / "config.json").read_text().replace('"num_hidden_layers": 3',
                                                                                       '"num_hidden_layers": 2'))
    with pytest.raises(ValueError, match="tensors the model of its config.json does not have"):
        load_model(str(folder))


def _whole_nll(model, rows):
    total = count = 0.0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for ids in rows:
            logits = model(ids.view(1, -1)).logits[0, :-1].float()
            total += torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum").item()
            count += ids.numel() - 1
    return total / count


@pytest.mark.parametrize("spec", [FORMATS[0], FORMATS[4]], ids=lambda s: s.label())
def test_streamed_perplexity_is_the_whole_models(spec, fp32_folder):
    from restora.infer.perplexity import StreamedNLL

    g = torch.Generator().manual_seed(5)
    rows = [torch.randint(0, 256, (n,), generator=g) for n in (7, 12, 20)]
    calibration = rows if spec.format == "gptq" else None
    whole = AutoModelForCausalLM.from_pretrained(fp32_folder, dtype=torch.float32).eval()
    expected_float = _whole_nll(whole, rows)
    quantize_model(whole, spec, calibration, progress=False)
    expected_quantized = _whole_nll(whole, rows)

    load = open_source(str(fp32_folder)).start()
    load.outside_blocks()
    nll = StreamedNLL(load.model, rows)
    stream_quantize(load, spec, calibration, progress=False, before_block=nll.float_block, after_block=nll.quantized_block)
    got_float, got_quantized = nll.result()
    assert got_float == pytest.approx(expected_float, rel=1e-3)
    assert got_quantized == pytest.approx(expected_quantized, rel=1e-3)
    assert abs(got_quantized - got_float) > 1e-4  # the two streams differ: quantization is seen


def test_quantize_command_streams_and_reports(tiny_dir, tmp_path, monkeypatch, capsys):
    import json

    from restora.cli import main

    monkeypatch.setenv("RESTORA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_dir), "--format", "gptq", "--bits", "4", "--group-size", "32",
                 "--calib-samples", "4", "--eval-samples", "3", "--out", str(out)]) == 0
    manifest = json.loads((out / "restora_manifest.json").read_text())
    ppl = manifest["perplexity"]
    assert ppl["rows"] == 3 and ppl["source"] > 1 and ppl["quantized"] > 1 and ppl["compute"] == "bf16"
    loaded = load_model(str(out))
    assert sum(isinstance(m, QuantLinear) for m in loaded.model.modules()) == 14
    assert "held-out perplexity on 3 sql rows" in capsys.readouterr().out


def test_the_safetensors_writer_and_reader_match_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    from restora.core.safetensors_file import read_header, read_tensor, write_file

    g = torch.Generator().manual_seed(0)
    tensors = {
        "bf16": torch.randn(5, 7, generator=g).to(torch.bfloat16),
        "codes": torch.randint(0, 255, (3, 8), generator=g, dtype=torch.uint8),
        "transposed": torch.randn(4, 6, generator=g).t(),  # not contiguous
        "scalar": torch.tensor(1.5),
        "empty": torch.zeros(0, 3),
        "fp16": torch.randn(9, generator=g).half(),
    }
    write_file(tensors, tmp_path / "ours.safetensors", {"format": "pt"})
    theirs = load_file(str(tmp_path / "ours.safetensors"))
    assert theirs.keys() == tensors.keys()
    for n, t in tensors.items():
        assert theirs[n].dtype == t.dtype and torch.equal(theirs[n], t), n
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(tmp_path / "theirs.safetensors"))
    header = read_header(tmp_path / "theirs.safetensors")
    for n, t in tensors.items():
        assert torch.equal(read_tensor(tmp_path / "theirs.safetensors", header[n], n), t), n
    data = (tmp_path / "theirs.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 10])
    with pytest.raises(ValueError, match="cut.safetensors is not a readable safetensors file.*truncated"):
        read_header(tmp_path / "cut.safetensors")


@pytest.mark.parametrize("shard_bytes", [1 << 30, 40_000], ids=["one-file", "sharded"])
def test_save_hf_loads_back_in_transformers(shard_bytes, sharded_bf16, tmp_path):
    from restora.models.save import save_hf

    model = load_model(str(sharded_bf16)).model
    save_hf(model, tmp_path / "out", shard_bytes=shard_bytes)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file() == (shard_bytes < 1 << 20)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()  # stored once, tied again
    for (n, a), (_, b) in zip(sorted(model.state_dict().items()), sorted(back.state_dict().items())):
        assert torch.equal(a, b), n
