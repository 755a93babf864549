"""FSDP2 under torchrun (2 gloo ranks) equals one process with the same global batch, for every format.

Run as a script under torchrun this file is its own worker (`_worker`): it shards tiny models
of every supported base format, checks that the base really is split over the ranks, and
that gradients, one AdamW step and the gathered adapter equal a single unsharded process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import kill_at_checkpoint
from safetensors.torch import load_file

from restora.cli import main

ARGS = ["--format", "rtn", "--bits", "4", "--task", "sql", "--max-samples", "32", "--batch-size", "8",
        "--micro-batch-size", "2", "--val-samples", "5", "--lr", "2e-3", "--max-len", "96", "--dropout", "0",
        "--no-bf16", "--targets", "attn"]
# (format, bits, double_quant, act_order, bf16 float base)
WORKER_SPECS = [("float", 16, False, False, False), ("float", 16, False, False, True), ("nf4", 4, True, False, False),
                ("fp4", 4, False, False, False), ("int8", 8, False, False, False), ("rtn", 3, False, False, False),
                ("gptq", 4, False, True, False)]


def _torchrun(args: list[str], **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return cmd, {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", **kw}


def _run(args: list[str]) -> subprocess.CompletedProcess:
    cmd, env = _torchrun(args)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)


def _losses(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


# -- in-process: the refusals -------------------------------------------------------------


def test_refuses_a_format_it_cannot_shard(tiny_model):
    from restora.train.fsdp import check_fsdp_formats
    from restora.quant.base import QuantizedWeight
    from restora.quant.linear import QuantLinear

    class ToyWeight(QuantizedWeight):
        format = "toy"

    q = tiny_model.model.layers[1].mlp.down_proj
    tiny_model.model.layers[1].mlp.down_proj = QuantLinear(ToyWeight(q.out_features, q.in_features))
    with pytest.raises(ValueError, match=r"cannot shard model\.layers\.1\.mlp\.down_proj: format 'toy'.*"
                                         r"supports float, nf4, fp4, int8, rtn, gptq"):
        check_fsdp_formats(tiny_model)


@pytest.mark.parametrize(("cfg", "match"), [({"optimizer": "adamw8bit"}, "optimizer 'adamw8bit'"),
                                            ({"batch_size": 9, "micro_batch_size": 3}, "batch_size 9 must be a multiple")])
def test_refuses_what_fsdp_cannot_split(tiny_model, tmp_path, cfg, match):
    from restora.adapters import LoRAConfig, add_lora
    from restora.train.distributed import DistInfo
    from restora.train.loop import TrainConfig, train

    add_lora(tiny_model, LoRAConfig(r=2))
    rows = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}] * 9
    with pytest.raises(ValueError, match=match):  # before any collective: no process group needed
        train(tiny_model, rows, [], TrainConfig(max_steps=1, **cfg), tmp_path, 0, lambda f, m: None,
              dist_info=DistInfo(0, 2, "fsdp"))


# -- 2 gloo ranks --------------------------------------------------------------------------


@pytest.mark.slow
def test_every_format_is_sharded_and_exact():
    p = _run([__file__])
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(next(x for x in p.stdout.splitlines() if x.startswith("{")))
    assert [r["format"] for r in report["formats"]] == [s[0] for s in WORKER_SPECS]
    for r in report["formats"]:
        assert r["block_params_sharded"], r  # every decoder-block tensor is a DTensor
        assert 0.45 < r["local_fraction"] <= 0.52, r  # rank 0 holds half of the blocks' bytes (codes included)


@pytest.mark.smollm
@pytest.mark.slow
def test_two_fsdp_ranks_equal_one_process(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RESTORA_CACHE", str(tmp_path / "cache"))
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    assert main(["train", str(tiny_dir), *ARGS, "--max-steps", "4", "--out", str(single)]) == 0
    p = _run(["-m", "restora.cli", "train", str(tiny_dir), *ARGS, "--max-steps", "4", "--parallel", "fsdp",
              "--out", str(sharded)])
    assert p.returncode == 0, p.stderr[-3000:]
    l1, l2 = _losses(single), _losses(sharded)
    assert len(l1) == len(l2) == 4
    for a, b in zip(l1, l2):
        assert abs(a["loss"] - b["loss"]) < 1e-5 * abs(a["loss"])
    assert abs(l1[-1]["val_loss"] - l2[-1]["val_loss"]) < 1e-5 * l1[-1]["val_loss"]  # 5 rows: rank 1 pads a forward
    a = load_file(str(single / "checkpoint" / "state.safetensors"))
    b = load_file(str(sharded / "checkpoint" / "state.safetensors"))
    assert a.keys() == b.keys()  # adapter, AdamW moments, RNG: the same file as without FSDP
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
        if k.startswith(("param/", "opt/")):
            assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    wa = load_file(str(single / "adapter_model.safetensors"))
    wb = load_file(str(sharded / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and wa  # the same PEFT folder, written from whole tensors
    for k in wa:
        assert wa[k].shape == wb[k].shape and torch.allclose(wa[k], wb[k], atol=1e-5, rtol=1e-4), k
    assert (single / "adapter_config.json").read_text() == (sharded / "adapter_config.json").read_text()


@pytest.mark.smollm
@pytest.mark.slow
def test_kill_and_resume_under_fsdp(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RESTORA_CACHE", str(tmp_path / "cache"))
    full, killed = tmp_path / "full", tmp_path / "killed"
    run = ["train", str(tiny_dir), *ARGS, "--max-steps", "8"]
    assert main([*run, "--out", str(full)]) == 0  # reference: one process (2 FSDP ranks equal it, above)
    cmd, env = _torchrun(["-m", "restora.cli", *run, "--parallel", "fsdp", "--out", str(killed)])
    assert 2 <= kill_at_checkpoint(cmd, env, killed) < 8  # torchrun and both ranks killed
    p = _run(["-m", "restora.cli", *run, "--parallel", "fsdp", "--out", str(killed), "--resume"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert [r["step"] for r in _losses(killed)][-1] == 8
    a = load_file(str(full / "checkpoint" / "state.safetensors"))
    b = load_file(str(killed / "checkpoint" / "state.safetensors"))
    for k in a:
        if k.startswith(("param/", "opt/")):
            assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k


# -- the worker (run by torchrun) ------------------------------------------------------------


def _build(fmt: str, bits: int, double_quant: bool, act_order: bool, bf16: bool):
    from conftest import tiny_llama

    from restora.adapters import LoRAConfig, add_lora
    from restora.quant.quantize import quantize_model
    from restora.quant.spec import QuantSpec

    m = tiny_llama(num_hidden_layers=3)
    if fmt == "float":
        if bf16:
            m.to(torch.bfloat16)
    else:
        g = torch.Generator().manual_seed(3)
        calib = [torch.randint(0, 256, (24,), generator=g) for _ in range(4)]
        spec = QuantSpec(format=fmt, bits=bits, group_size=32, double_quant=double_quant, act_order=act_order)
        quantize_model(m, spec, calibration=calib, progress=False)
    torch.manual_seed(1)
    add_lora(m, LoRAConfig(r=4, target_modules="all"))
    with torch.no_grad():  # B != 0, so that every adapter tensor has a gradient
        for n, p in m.named_parameters():
            if n.endswith("lora_B.weight"):
                p.normal_(0, 0.05)
    return m


def _worker() -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from restora.adapters.inject import adapter_state_dict
    from restora.train.distributed import DistInfo
    from restora.train.fsdp import full_tensor, gathered_adapter, shard_as, shard_for_training
    from restora.core.modules import decoder_blocks
    from restora.train.loop import completion_loss

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    info = DistInfo(dist.get_rank(), dist.get_world_size(), "fsdp")
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 256, (4, 12), generator=g)  # (B, T): the global batch
    labels, mask = ids.clone(), torch.ones_like(ids)
    labels[:, :5] = -100
    n_labels = int((labels[:, 1:] != -100).sum())
    mine = slice(info.rank, None, info.world_size)
    report = []
    for spec in WORKER_SPECS:
        bf16 = spec[4]
        ref = _build(*spec)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            s_ref, _ = completion_loss(ref, ids, labels, mask)
        (s_ref / n_labels).backward()
        ref_named = {n: p for n, p in ref.named_parameters() if p.requires_grad}
        ref_grads = {n: p.grad.clone() for n, p in ref_named.items()}
        torch.optim.AdamW(list(ref_named.values()), lr=1e-2).step()

        model = _build(*spec)
        root = shard_for_training(model, completion_loss, info)
        block_params = [t for b in decoder_blocks(model) for t in b.parameters()]
        block_tensors = block_params + [t for b in decoder_blocks(model) for t in b.buffers()]  # buffers: replicated
        local = sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in block_tensors)
        total = sum(t.numel() * t.element_size() for t in block_tensors)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            s, _ = root(ids[mine], labels[mine], mask[mine])
        (s / n_labels).backward()
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        assert named.keys() == ref_named.keys()
        tol = {"atol": 2e-3, "rtol": 2e-2} if bf16 else {"atol": 1e-6, "rtol": 1e-4}
        for n, p in named.items():
            grad = full_tensor(p.grad)
            assert torch.allclose(grad, ref_grads[n], **tol), (spec, n, float((grad - ref_grads[n]).abs().max()))
        opt = torch.optim.AdamW(list(named.values()), lr=1e-2)
        opt.step()
        moment = next(iter(opt.state.values()))["exp_avg"]
        assert isinstance(moment, DTensor)  # AdamW moments are sharded too
        back = full_tensor(shard_as(full_tensor(moment), moment))
        assert torch.equal(back, full_tensor(moment))  # whole -> piece -> whole round-trips
        mine_full = {n: full_tensor(p.detach()) for n, p in named.items()}
        with gathered_adapter(model):
            got = adapter_state_dict(model)  # what save_adapter writes
        want = adapter_state_dict(ref)
        assert got.keys() == want.keys()
        for (n, p), k in zip(named.items(), want):
            assert k.endswith(n) and not isinstance(got[k], DTensor) and torch.equal(got[k], mine_full[n]), (spec, k)
            if not bf16:  # after an AdamW step; under bf16 the steps of near-zero gradients may flip sign
                assert torch.allclose(got[k], want[k], atol=1e-5, rtol=1e-4), (spec, k)
        assert all(isinstance(p, DTensor) for p in named.values())  # the sharded parameters are back
        report.append({"format": spec[0], "local_fraction": local / total,
                       "block_params_sharded": all(isinstance(t, DTensor) for t in block_params)})
    if info.is_main:
        print(json.dumps({"formats": report}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # conftest's tiny_llama
    _worker()
