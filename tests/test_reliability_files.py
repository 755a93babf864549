"""Files and training under bad input and faults: all-or-nothing writes under SIGKILL at every step, training runs
that refuse to be overwritten or resumed with other settings, one-line errors for damaged adapters."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama

from restora import commands
from restora.adapters import LoRAConfig, add_lora, load_adapter, save_adapter
from restora.cli import main
from restora.core.atomic import KILL_AT_ENV, PENDING, _umask, atomic_dir, atomic_files, recover, write_text_atomic
from restora.train.loop import TrainConfig, train

WRITER = """
import sys
from pathlib import Path
from restora.core.atomic import atomic_dir
with atomic_dir(Path(sys.argv[1])) as tmp:
    for i in range(3):
        (tmp / f"part{i}").write_text(sys.argv[2])
"""


def _killed(status_or_code: int, forked: bool) -> bool:
    if forked:
        return os.WIFSIGNALED(status_or_code) and os.WTERMSIG(status_or_code) == signal.SIGKILL
    return status_or_code == -signal.SIGKILL


def _read_parts(folder: Path) -> set[str]:
    folder = recover(folder)
    parts = sorted(p.name for p in folder.iterdir())
    assert parts == ["part0", "part1", "part2"], parts  # a whole version: every file present
    return {(folder / p).read_text() for p in parts}


def test_atomic_dir_killed_at_every_step_leaves_old_or_new(tmp_path):
    """A separate writer process SIGKILLs itself at its k-th step, for every k: the reader always sees one
    whole version, the old one until the swap and the new one after; temporaries never pile up."""
    target = tmp_path / "folder"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    assert subprocess.run([sys.executable, "-c", WRITER, str(target), "old"], env=env).returncode == 0
    seen = []
    for k in range(1, 20):
        code = subprocess.run([sys.executable, "-c", WRITER, str(target), "new"], env={**env, KILL_AT_ENV: str(k)}).returncode
        versions = _read_parts(target)
        assert len(versions) == 1, f"kill at step {k}: a mix {versions}"
        seen.append(versions.pop())
        if not _killed(code, forked=False):
            assert code == 0 and seen[-1] == "new"
            break
        if seen[-1] == "new":
            assert subprocess.run([sys.executable, "-c", WRITER, str(target), "old"], env=env).returncode == 0
    else:
        raise AssertionError("the writer never finished")
    assert "old" in seen and seen.count("new") >= 2, seen  # killed both before and after the swap
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]  # no .tmp / .old left after recovery


def test_leftover_old_comes_back_and_stale_temporaries_are_cleared(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as tmp:
        for i in range(3):
            (tmp / f"part{i}").write_text("v1")
    os.replace(target, tmp_path / ".ckpt.old")  # as a kill between the two renames leaves it
    (tmp_path / ".ckpt.tmpdead").mkdir()  # a dead writer's temporaries
    (tmp_path / ".ckpt.tmpdead" / "part0").write_text("v2")
    assert _read_parts(target) == {"v1"}  # the reader brings the previous version back
    os.replace(target, tmp_path / ".ckpt.old")
    with atomic_dir(target) as tmp:  # the next write: recovers first, never deletes the only good copy
        assert (target / "part0").read_text() == "v1"
        for i in range(3):
            (tmp / f"part{i}").write_text("v2")
    assert _read_parts(target) == {"v2"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    (target / ".restora-stage-dead").mkdir()
    with atomic_files(target) as stage:
        (stage / "part0").write_text("v3")
    assert not (target / ".restora-stage-dead").exists() and (target / "part0").read_text() == "v3"


def _lora(r: int, seed: int):
    model = tiny_llama()
    add_lora(model, LoRAConfig(r=r, alpha=2 * r, target_modules="attn"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02, generator=g)
    return model


def test_write_text_atomic_replaces_whole_or_keeps_the_old(tmp_path, monkeypatch):
    path = tmp_path / "cells" / "a.json"
    write_text_atomic(path, "old\n")  # makes the folder
    write_text_atomic(path, "new\n")
    assert path.read_text() == "new\n"

    def fail(*_):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(path, "newer\n")
    assert path.read_text() == "new\n"
    assert [f.name for f in path.parent.iterdir()] == ["a.json"]  # no temporary left behind
    monkeypatch.undo()
    (path.parent / ".a.json.tmp123").write_text("a dead writer's")
    os.chmod(path, 0o640)
    write_text_atomic(path, "newest\n")
    assert [f.name for f in path.parent.iterdir()] == ["a.json"]  # the dead writer's temporary is gone
    assert path.stat().st_mode & 0o777 == 0o640  # the file keeps its mode
    write_text_atomic(path.parent / "b.json", "{}")
    assert (path.parent / "b.json").stat().st_mode & 0o777 == 0o666 & ~_umask()  # a new file: the umask's mode


def test_save_adapter_killed_at_every_step_leaves_old_or_new(tmp_path):
    """save_adapter into a folder holding a run (metrics, checkpoint) killed at every step: the three adapter
    files always load as one version (config, weights and restora.json agree); the run's other files stay."""
    out = tmp_path / "run"
    old, new = _lora(2, 1), _lora(4, 2)
    save_adapter(old, out, {"notes": "old"})
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    seen = []
    for k in range(1, 30):
        pid = os.fork()
        if pid == 0:  # the writer process
            os.environ[KILL_AT_ENV] = str(k)
            try:
                save_adapter(new, out, {"notes": "new"})
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        reader = tiny_llama()
        info = load_adapter(reader, out)
        version = info.provenance["notes"]
        assert info.config.r == {"old": 2, "new": 4}[version], f"kill at step {k}: config and restora.json differ"
        source = {"old": old, "new": new}[version].state_dict()
        for name, t in reader.state_dict().items():
            if "lora_" in name:
                assert torch.equal(t, source[name]), f"kill at step {k}: weights of another version"
        assert not (out / PENDING).exists()
        seen.append(version)
        if not _killed(status, forked=True):
            assert version == "new"
            break
        if version == "new":
            save_adapter(old, out, {"notes": "old"})
    else:
        raise AssertionError("the writer never finished")
    assert "old" in seen and seen.count("new") >= 2, seen
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "metrics.jsonl", "restora.json"]


# --- training runs: no silent restart, no resume with other settings ---------------------------------------------

TRAIN = ["--task", "sql", "--max-samples", "16", "--batch-size", "8", "--micro-batch-size", "8", "--val-samples", "4",
         "--max-len", "96", "--max-steps", "1", "--format", "rtn", "--bits", "4", "--rank", "4", "--no-bf16"]


@pytest.fixture
def trained(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RESTORA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["train", str(tiny_dir), "--out", str(out), *TRAIN]) == 0
    return tiny_dir, out


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.smollm  # the tiny model borrows SmolLM2's tokenizer
def test_rerun_without_resume_is_refused_and_overwrite_starts_over(trained, capsys):
    tiny, out = trained
    metrics = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(["train", str(tiny), "--out", str(out), *TRAIN]) == 2
    err = _err(capsys)
    assert "already holds a training run" in err and "--resume" in err and "--overwrite" in err
    assert (out / "metrics.jsonl").read_text() == metrics  # nothing touched
    assert main(["train", str(tiny), "--out", str(out), *TRAIN, "--resume", "--overwrite"]) == 2
    assert "exclude each other" in _err(capsys)
    assert main(["train", str(tiny), "--out", str(out), *TRAIN, "--overwrite"]) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1]  # one run's metrics, not two step 1s


@pytest.mark.smollm
@pytest.mark.parametrize("change, field, was, now", [
    (["--rank", "8"], "rank", "4", "8"),
    (["--format", "int8", "--bits", "8"], "format", "'rtn'", "'int8'"),
    (["--bits", "3"], "bits", "4", "3"),
    (["--targets", "attn"], "targets", "'all'", "'attn'"),
    (["--max-len", "64"], "max_len", "96", "64"),
    (["--task", "gsm8k"], "task", "'sql'", "'gsm8k'"),
    (["--max-samples", "8"], "max_samples", "16", "8"),
])
def test_resume_with_other_run_settings_is_refused(trained, capsys, change, field, was, now):
    tiny, out = trained
    capsys.readouterr()
    args = [*TRAIN, *change, "--resume"]
    assert main(["train", str(tiny), "--out", str(out), *args]) == 2
    assert f"setting {field} was {was}, now {now}" in _err(capsys)


@pytest.mark.smollm
def test_resume_with_other_model_or_data_is_refused(trained, tmp_path, capsys):
    from conftest import make_tiny_llama_dir

    tiny, out = trained
    other = make_tiny_llama_dir(tmp_path / "other")
    capsys.readouterr()
    assert main(["train", str(other), "--out", str(out), *TRAIN, "--resume"]) == 2
    assert f"setting model was {str(tiny)!r}, now {str(other)!r}" in _err(capsys)
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(40)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run2 = tmp_path / "run2"
    args = ["--out", str(run2), *TRAIN, "--task", str(data)]
    assert main(["train", str(tiny), *args]) == 0
    data.write_text("".join(json.dumps({**r, "completion": r["completion"] + "!"}) + "\n" for r in rows))
    capsys.readouterr()
    assert main(["train", str(tiny), *args, "--resume"]) == 2
    assert "setting data was" in _err(capsys)


def test_resume_onto_an_adapter_of_another_rank_is_a_one_line_error(tmp_path):
    """The library loop without run settings: a rank change is refused by shape, not a raw copy_ error."""
    rows = [{"input_ids": list(range(1, 12)), "labels": [-100] * 4 + list(range(5, 12))} for _ in range(8)]
    cfg = TrainConfig(max_steps=1, batch_size=4, micro_batch_size=4, bf16=False)
    model = _lora(2, 1).train()
    train(model, rows, [], cfg, tmp_path, 0, lambda folder, metrics: None, progress=False)
    with pytest.raises(ValueError, match=r"cannot resume from .*checkpoint: adapter tensor .*lora_A.weight has shape "
                                         r"\(2, 64\) there, the adapter now has \(4, 64\)"):
        train(_lora(4, 1).train(), rows, [], cfg, tmp_path, 0, lambda folder, metrics: None, resume=True,
              progress=False)


# --- damaged adapters and missing extras: one line, exit 2 -----------------------------------------------------------

@pytest.fixture
def adapter(tmp_path):
    out = tmp_path / "adapter"
    save_adapter(_lora(2, 1), out)
    return out


def test_eval_on_a_truncated_adapter_is_one_line(adapter, capsys):
    f = adapter / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    assert main(["eval", "smollm2-135m", "--adapter", str(adapter)]) == 2
    err = _err(capsys)
    assert str(f) in err and "truncated" in err
    f.write_bytes(f.read_bytes()[:5])
    assert main(["eval", "smollm2-135m", "--adapter", str(adapter)]) == 2
    assert f"{f}: not a safetensors file" in _err(capsys)


@pytest.mark.parametrize("field, value, expected", [
    ("lora_alpha", "sixteen", "expected a number"), ("r", 2.5, "expected a positive integer"),
    ("lora_dropout", "0.1", "expected a number in [0, 1)"), ("r", None, "expected a positive integer"),
])
def test_eval_on_an_adapter_config_with_a_wrong_type_is_one_line(adapter, capsys, field, value, expected):
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config[field] = value
    path.write_text(json.dumps(config))
    assert main(["eval", "smollm2-135m", "--adapter", str(adapter)]) == 2
    err = _err(capsys)
    assert str(path) in err and f"field {field!r} is {value!r}" in err and expected in err


def test_eval_on_an_adapter_with_a_broken_restora_json_is_one_line(adapter, capsys):
    (adapter / "restora.json").write_text('{"base_model": ')
    assert main(["eval", "smollm2-135m", "--adapter", str(adapter)]) == 2
    assert "restora.json: not valid JSON" in _err(capsys)


def test_missing_optional_dependency_names_the_extra(monkeypatch, capsys):
    def info(folder: str) -> int:
        """Stand-in that imports an optional dependency deep inside.

        Args:
            folder: unused.
        """
        raise ModuleNotFoundError("No module named 'uvicorn.config'", name="uvicorn.config")

    monkeypatch.setitem(commands.COMMANDS, "info", info)
    assert main(["info", "x"]) == 2
    assert _err(capsys) == "restora: error: uvicorn is not installed: pip install 'restora[serve]'"
