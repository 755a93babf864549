"""torchrun with 2 gloo processes equals one process with the same global batch; resume under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import kill_at_checkpoint
from safetensors.torch import load_file

from restora.cli import main

pytestmark = [pytest.mark.smollm, pytest.mark.slow]

ARGS = ["--format", "rtn", "--bits", "4", "--task", "sql", "--max-samples", "32", "--batch-size", "8",
        "--micro-batch-size", "4", "--val-samples", "8", "--lr", "2e-3", "--max-len", "96", "--dropout", "0",
        "--no-bf16", "--targets", "attn"]




def _torchrun(args, env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
           "-m", "restora.cli", *args]
    return subprocess.run(cmd, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)


def test_two_ranks_equal_one_process(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RESTORA_CACHE", str(tmp_path / "cache"))
    single, double = tmp_path / "single", tmp_path / "double"
    assert main(["train", str(tiny_dir), *ARGS, "--max-steps", "4", "--out", str(single)]) == 0
    p = _torchrun(["train", str(tiny_dir), *ARGS, "--max-steps", "4", "--out", str(double)], dict(os.environ))
    assert p.returncode == 0, p.stderr[-2000:]
    l1 = [json.loads(x)["loss"] for x in (single / "metrics.jsonl").read_text().splitlines()]
    l2 = [json.loads(x)["loss"] for x in (double / "metrics.jsonl").read_text().splitlines()]
    assert len(l1) == len(l2) == 4
    assert all(abs(a - b) < 1e-4 * abs(a) for a, b in zip(l1, l2))
    a = load_file(str(single / "checkpoint" / "state.safetensors"))
    b = load_file(str(double / "checkpoint" / "state.safetensors"))
    for k in a:
        if k.startswith("param/"):
            assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k


def test_kill_and_resume_under_torchrun(tiny_dir, tmp_path, monkeypatch):

    monkeypatch.setenv("RESTORA_CACHE", str(tmp_path / "cache"))
    env = dict(os.environ)
    full, killed = tmp_path / "full", tmp_path / "killed"
    run = ["train", str(tiny_dir), *ARGS, "--max-steps", "8"]
    assert _torchrun([*run, "--out", str(full)], env).returncode == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29534",
           "-m", "restora.cli", *run, "--out", str(killed)]
    assert 2 <= kill_at_checkpoint(cmd, {**env, "OMP_NUM_THREADS": "1"}, killed) < 8  # torchrun and both ranks
    p = _torchrun([*run, "--out", str(killed), "--resume"], env)
    assert p.returncode == 0, p.stderr[-2000:]
    a = load_file(str(full / "checkpoint" / "state.safetensors"))
    b = load_file(str(killed / "checkpoint" / "state.safetensors"))
    for k in a:
        if k.startswith("param/"):
            assert torch.allclose(a[k], b[k], atol=1e-6), k
