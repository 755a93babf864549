"""Compiled decoder blocks: training with them follows the eager run, and the model comes back eager."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import tiny_llama

from restora.adapters import LoRAConfig, add_lora
from restora.kernels.compiled import compiled_blocks, resolve_compile
from restora.quant import QuantSpec, quantize_model
from restora.core.modules import decoder_blocks
from restora.train.loop import TrainConfig, train


def _rows(n: int, seed: int) -> list[dict[str, list[int]]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        p, c = rng.randint(3, 9), rng.randint(2, 7)  # ragged lengths: one graph must serve them all
        ids = [rng.randrange(1, 256) for _ in range(p + c)]
        rows.append({"input_ids": ids, "labels": [-100] * p + ids[p:]})
    return rows


def _run(tmp_path, name: str, compile: bool) -> tuple[list[float], dict[str, torch.Tensor], torch.nn.Module]:
    torch.manual_seed(0)
    model = tiny_llama()
    quantize_model(model, QuantSpec("nf4", 4, group_size=32), progress=False)  # dequantization is traced too
    add_lora(model, LoRAConfig(r=4, alpha=8, target_modules="all"))
    with torch.no_grad():  # B = 0 would make every adapter gradient but B's vanish
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    cfg = TrainConfig(epochs=2, batch_size=4, micro_batch_size=2, bf16=False, compile="on" if compile else "off",
                      save_every=0)
    out = tmp_path / name
    summary = train(model, _rows(8, 1), _rows(3, 2), cfg, out, 0, lambda f, m: None, progress=False)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    vals = [h["val_loss"] for h in summary["history"]]
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return losses + vals, adapter, model


def test_compiled_training_matches_eager(tmp_path):
    pytest.importorskip("torch._inductor")
    from torch._dynamo.utils import counters

    eager_losses, eager_adapter, _ = _run(tmp_path, "eager", False)
    counters.clear()
    losses, adapter, model = _run(tmp_path, "compiled", True)
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]  # really compiled, whole blocks
    assert len(losses) == len(eager_losses) == 6  # 4 steps, 2 validation passes
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), rtol=1e-4, atol=1e-5)
    for n, p in eager_adapter.items():
        torch.testing.assert_close(adapter[n], p, rtol=1e-3, atol=1e-5, msg=n)
    assert all(b._compiled_call_impl is None for b in decoder_blocks(model))  # eager again after training


def test_compiled_blocks_restores_eager_on_error():
    model = tiny_llama()
    with pytest.raises(RuntimeError, match="boom"), compiled_blocks(model) as n:
        assert n == 2 and all(b._compiled_call_impl is not None for b in decoder_blocks(model))
        raise RuntimeError("boom")
    assert all(b._compiled_call_impl is None for b in decoder_blocks(model))


def test_compiled_blocks_keep_compiling_past_dynamos_default_limit():
    """A grid trains several bases in one process, and each adds graphs to the one block forward's cache
    (first block, later blocks, no-grad validation: 3 or 4 per base). Past dynamo's default of 8 graphs the blocks ran
    eagerly; inside compiled_blocks every new variant is still compiled."""
    pytest.importorskip("torch._inductor")
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # no graphs left from earlier tests: this one makes more than 8 of its own
    counters.clear()
    ids = torch.randint(0, 200, (2, 6))
    for spec in (None, QuantSpec("rtn", 4, 32), QuantSpec("nf4", 4, 32)):
        model = tiny_llama()
        if spec is not None:
            quantize_model(model, spec, progress=False)
        add_lora(model, LoRAConfig(r=2, alpha=4, target_modules="attn"))
        with compiled_blocks(model):
            model(ids).logits.sum().backward()  # block 0's input needs no grad, block 1's does: two graphs
            with torch.no_grad():
                model(ids)  # a third
    assert counters["stats"]["unique_graphs"] > 8  # dynamo's default would have stopped at 8


def test_resolve_compile(monkeypatch):
    tiny = tiny_llama()
    assert resolve_compile("auto", tiny) is False  # unit-test sized: compiling costs more than it saves
    assert resolve_compile("on", tiny) is True and resolve_compile("off", tiny) is False
    with pytest.raises(ValueError, match="compile must be auto, on or off, got 'yes'"):
        resolve_compile("yes", tiny)  # type: ignore[arg-type]
    import restora.kernels.compiled as compiled

    monkeypatch.setattr(compiled, "AUTO_MIN_PARAMS", 0)  # every model "large enough"
    assert resolve_compile("auto", tiny) is True and resolve_compile("auto", tiny, sharded=True) is False
