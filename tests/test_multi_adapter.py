"""Many adapters in one batch (restora.adapters.batched, restora.adapters.multi) on a tiny random Llama.

The reference is always the single-adapter path: a fresh copy of the base with `load_adapter`
of one folder (or no adapter for a base row), run on that row alone. Checked:
  - a mixed batch (LoRA r=2, 4 and 16, rsLoRA r=8 with different target sets, (IA)³, a base
    row) equals the row-by-row outputs, on a float, an RTN 4-bit and an NF4 base
  - all rows on one adapter (the no-gather path) equals it too, and all-BASE rows equal the base
  - greedy_generate with row_adapters / set_rows equals each row generated alone, including
    rows that finish early (the batch shrinks and set_rows is called again)
  - adding and removing adapters leaves the other rows' outputs unchanged; a freed slot is
    reused; removing everything unwraps every layer
  - bad input gets one-line errors and leaves the model as it was
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import tiny_llama
from restora.adapters import IA3Config, LoRAConfig, adapter_modules, add_ia3, add_lora, load_adapter, save_adapter
from restora.adapters.batched import BASE, MultiLoRALinear, set_rows
from restora.adapters.multi import MultiAdapterModel, load_adapters
from restora.infer.generate import greedy_generate
from restora.quant import QuantSpec, quantize_model

ADAPTERS = {
    "r2": LoRAConfig(r=2, alpha=4),
    "attn4": LoRAConfig(r=4, alpha=8, target_modules="attn"),
    "rs8": LoRAConfig(r=8, alpha=8, use_rslora=True, init="gaussian", target_modules=["q_proj", "v_proj", "down_proj"]),
    "mlp16": LoRAConfig(r=16, alpha=16, target_modules=["gate_proj", "up_proj", "o_proj"]),
    "ia3": IA3Config(),
}
ROWS = ["r2", "attn4", None, "rs8", "ia3", "mlp16"]
FORMATS = {"float": None, "rtn4": QuantSpec("rtn", 4, 64), "nf4": QuantSpec("nf4", 4, 64)}
HASH = "sha256:tiny"
_BASES: dict[str, nn.Module] = {}


def base(fmt: str = "float") -> nn.Module:
    """A fresh copy of the tiny Llama in format `fmt` (quantized once per test run)."""
    if fmt not in _BASES:
        model = tiny_llama(seed=0)
        if FORMATS[fmt] is not None:
            quantize_model(model, FORMATS[fmt], progress=False)
        _BASES[fmt] = model
    return copy.deepcopy(_BASES[fmt])


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One saved folder per adapter, with random (non-identity) weights."""
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for i, (name, config) in enumerate(ADAPTERS.items()):
        model = base()
        torch.manual_seed(100 + i)
        if isinstance(config, LoRAConfig):
            add_lora(model, config)
        else:
            add_ia3(model, config)
        with torch.no_grad():
            for _, m in adapter_modules(model):
                for p in m.adapter_params():
                    p.add_(torch.randn_like(p) * 0.3)
        out[name] = str(save_adapter(model, root / name, provenance={"source_hash": HASH}))
    return out


def inputs(batch: int, seed: int = 0, T: int = 12) -> torch.Tensor:
    return torch.randint(0, 256, (batch, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def single(fmt: str, folder: str | None, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the single-adapter path: a fresh base with load_adapter(folder) (None: no adapter)."""
    model = base(fmt)
    if folder is not None:
        load_adapter(model, folder)
    return model(input_ids=ids).logits


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_mixed_batch_equals_row_by_row(fmt: str, folders: dict[str, str]) -> None:
    model = base(fmt)
    bank = load_adapters(model, {n: folders[n] for n in ADAPTERS}, expected_source_hash=HASH)
    assert [bank.adapter_index(n) for n in ADAPTERS] == [1, 2, 3, 4, 5] and bank.adapter_index(None) == BASE
    ids = inputs(len(ROWS))
    bank.set_rows(bank.rows(ROWS))
    with torch.no_grad():
        mixed = model(input_ids=ids).logits
    for b, name in enumerate(ROWS):
        ref = single(fmt, None if name is None else folders[name], ids[b : b + 1])
        torch.testing.assert_close(mixed[b : b + 1], ref, rtol=0, atol=2e-5, msg=f"row {b} ({name})")
    if fmt == "float":  # every row different from the base except the base row: adapters did something
        plain = single(fmt, None, ids)
        differs = [(mixed[b] - plain[b]).abs().max().item() > 1e-3 for b in range(len(ROWS))]
        assert differs == [name is not None for name in ROWS]


def test_uniform_and_base_rows(folders: dict[str, str]) -> None:
    model = base()
    bank = load_adapters(model, {n: folders[n] for n in ADAPTERS})
    ids = inputs(3, seed=1)
    with torch.no_grad():
        for name in ("rs8", "ia3"):
            set_rows(model, torch.full((3,), bank.adapter_index(name)))
            torch.testing.assert_close(model(input_ids=ids).logits, single("float", folders[name], ids), rtol=0, atol=2e-5)
        set_rows(model, [BASE] * 3)
        assert torch.equal(model(input_ids=ids).logits, single("float", None, ids))


@pytest.mark.parametrize("T", [1, 12, 40])  # decode-sized rows run the adapter term in fp32, prefill in bf16
def test_mixed_batch_under_bf16_autocast(folders: dict[str, str], T: int) -> None:
    """The serving dtype: same computation up to bf16 rounding."""
    model = base()
    bank = load_adapters(model, {n: folders[n] for n in ADAPTERS})
    ids = inputs(len(ROWS), seed=2, T=T)
    bank.set_rows(bank.rows(ROWS))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(input_ids=ids).logits.float()
    for b, name in enumerate(ROWS):
        folder = None if name is None else folders[name]
        ref = single("float", folder, ids[b : b + 1]).float()  # fp32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            own = single("float", folder, ids[b : b + 1]).float()  # the one-adapter model, bf16 autocast
        # as close to fp32 as the one-adapter model under the same autocast is (bf16 rounding)
        err, own_err = (mixed[b] - ref[0]).abs().max().item(), (own[0] - ref[0]).abs().max().item()
        assert err <= 1.5 * own_err + 0.01 * ref.abs().max().item(), f"row {b} ({name}): {err} vs {own_err}"


class ByteTokenizer:
    """Tokens are bytes (vocab 256); enough of a tokenizer for greedy_generate."""

    pad_token_id = 0

    def __init__(self, eos: int) -> None:
        self.eos_token_id = eos

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": list(text.encode("latin-1"))}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return bytes(ids).decode("latin-1")


def test_generate_with_row_adapters(folders: dict[str, str]) -> None:
    prompts = ["abc", "hello there", "x", "the quick brown", "zz top", "restora!"]  # different lengths: left padding
    names = ["r2", "attn4", None, "rs8", "ia3", "mlp16"]

    def alone(eos: int) -> list[str]:
        outs = []
        for prompt, name in zip(prompts, names):
            model = base()
            if name is not None:
                load_adapter(model, folders[name])
            outs.append(greedy_generate(model, ByteTokenizer(eos), [prompt], max_new_tokens=8, bf16=False)[0])
        return outs

    # Pick as EOS a token some row produces early, so rows finish at different steps.
    first = alone(eos=1000)
    eos = ord(first[1][2])
    expected = alone(eos)
    assert len({len(e) for e in expected}) > 1

    model = base()
    bank = load_adapters(model, {n: folders[n] for n in ADAPTERS})
    got = greedy_generate(
        model, ByteTokenizer(eos), prompts, max_new_tokens=8, bf16=False,
        row_adapters=[bank.adapter_index(n) for n in names], set_rows=set_rows,
    )
    assert got == expected


def test_add_remove_keeps_other_rows(folders: dict[str, str]) -> None:
    model = base()
    plain = base()
    bank = load_adapters(model, {n: folders[n] for n in ("r2", "rs8", "ia3")})
    ids = inputs(4, seed=3)

    def run(rows: list[str | None]) -> torch.Tensor:
        bank.set_rows(bank.rows(rows))
        with torch.no_grad():
            return model(input_ids=ids).logits

    before = run(["r2", "rs8", "ia3", None])
    bank.add_adapter("mlp16", folders["mlp16"])  # larger rank: every layer's stack is re-padded
    assert bank.adapter_index("mlp16") == 4
    after = run(["r2", "rs8", "ia3", "mlp16"])
    # the same adapters' terms, but the stacks' zero padding (rank 8 -> 16) changes the batched matmul's reduction
    # blocking on some CPUs (AMD EPYC: up to 6e-6 apart in fp32), so fp32 rounding, not equality
    torch.testing.assert_close(after[:3], before[:3], rtol=0, atol=2e-5)
    torch.testing.assert_close(after[3:], single("float", folders["mlp16"], ids[3:]), rtol=0, atol=2e-5)

    bank.remove_adapter("rs8")
    assert "rs8" not in bank and bank.adapter_index("r2") == 1 and bank.adapter_index("ia3") == 3
    with pytest.raises(ValueError, match="empty slots"):
        bank.set_rows([2, 0, 0, 0])
    removed = run(["r2", None, "ia3", "mlp16"])
    torch.testing.assert_close(removed[[0, 2, 3]], after[[0, 2, 3]], rtol=0, atol=1e-6)
    rs8_layers = [p for p, m in bank.layers().items() if m.rank > 0]
    assert all(bank.layers()[p].rank in (2, 16) for p in rs8_layers)  # rank 8 stacks shrank away

    assert bank.add_adapter("attn4", folders["attn4"]) == 2  # the freed slot is reused
    again = run(["r2", "attn4", "ia3", "mlp16"])
    torch.testing.assert_close(again[[0, 2, 3]], after[[0, 2, 3]], rtol=0, atol=1e-6)
    torch.testing.assert_close(again[1:2], single("float", folders["attn4"], ids[1:2]), rtol=0, atol=2e-5)

    for name in list(bank.names):
        bank.remove_adapter(name)
    assert not bank.layers() and not list(adapter_modules(model))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_bad_input(folders: dict[str, str], tmp_path) -> None:
    model = base()
    bank = load_adapters(model, {"r2": folders["r2"]})
    with pytest.raises(ValueError, match="already loaded"):
        bank.add_adapter("r2", folders["rs8"])
    with pytest.raises(KeyError, match="no adapter named 'nope'"):
        bank.adapter_index("nope")
    with pytest.raises(ValueError, match="out of range"):
        set_rows(model, [0, 7])
    set_rows(model, [1, 0])
    with pytest.raises(ValueError, match="rows for 2 rows, the batch has 3"):
        model(input_ids=inputs(3))
    with pytest.raises(ValueError, match="trained on base sha256:tiny, this base is other"):
        bank.add_adapter("rs8", folders["rs8"], expected_source_hash="other")
    # a folder whose weights lack a tensor: refused before anything changes
    bad = tmp_path / "bad"
    shutil.copytree(folders["rs8"], bad)
    state = load_file(f"{folders['rs8']}/adapter_model.safetensors")
    state.pop(sorted(state)[0])
    save_file(state, str(bad / "adapter_model.safetensors"))
    layers_before = set(bank.layers())
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: missing adapter tensor"):
        bank.add_adapter("bad", bad)
    assert set(bank.layers()) == layers_before and bank.names == ["r2"]
    # wider rank in the config than in the file
    config = json.loads((bad / "adapter_config.json").read_text())
    config["r"] = 9
    (bad / "adapter_config.json").write_text(json.dumps(config))
    save_file(load_file(f"{folders['rs8']}/adapter_model.safetensors"), str(bad / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="shape mismatch"):
        bank.add_adapter("bad", bad)
    # single adapters and multi adapters do not mix
    other = base()
    load_adapter(other, folders["r2"])
    with pytest.raises(ValueError, match="already has a single adapter"):
        MultiAdapterModel(other)
    with pytest.raises(ValueError, match="already has multi-adapter layers"):
        MultiAdapterModel(model)
    layer = next(iter(bank.layers().values()))
    assert isinstance(layer, MultiLoRALinear)
    with pytest.raises(ValueError, match="cannot merge"):
        layer.merge()


@pytest.mark.peer
def test_peft_folder_in_a_mixed_batch(folders: dict[str, str], tmp_path) -> None:
    """A folder saved by real PEFT serves its rows next to restora folders, with PEFT's own outputs."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(7)
    peft_model = peft.get_peft_model(
        base(), peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "up_proj"], use_rslora=True)
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    peft_model.save_pretrained(tmp_path / "peft")
    model = base()
    bank = load_adapters(model, {"r2": folders["r2"], "peft": tmp_path / "peft"})
    ids = inputs(3, seed=4)
    bank.set_rows(bank.rows(["peft", "r2", None]))
    with torch.no_grad():
        mixed = model(input_ids=ids).logits
        ref = peft_model.eval()(input_ids=ids[:1]).logits
    torch.testing.assert_close(mixed[:1], ref, rtol=0, atol=2e-5)
    torch.testing.assert_close(mixed[1:2], single("float", folders["r2"], ids[1:2]), rtol=0, atol=2e-5)
