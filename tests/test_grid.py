"""The PLR grid on a tiny model: train once per unit, every restore level, resume, shards, reports."""

from __future__ import annotations

import json

import pytest

from restora.cli import main
from restora.experiments.grid import load_grid_config, parse_shard, plan_units

pytestmark = pytest.mark.smollm  # the tiny model borrows SmolLM2's tokenizer

CONFIG = """
model = "{model}"
tasks = ["sql"]
seeds = [0]
restore_bits = [8, 16]

[[methods]]
name = "lora"
format = "float"
bits = [16]

[[methods]]
name = "rtn"
format = "rtn"
bits = [4, 2]
train = {{ max_steps = 1 }}

[train]
targets = "attn"
max_steps = 2
batch_size = 8
micro_batch_size = 8
max_samples = 16
val_samples = 8
max_len = 96
lr = 2e-3

[eval]
split = "test"
limit = 6
max_new_tokens = 4
batch_size = 6
"""




@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("RESTORA_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _config(tmp_path, tiny_dir):
    p = tmp_path / "grid.toml"
    p.write_text(CONFIG.format(model=tiny_dir))
    return p


def test_plan_restore_levels(tmp_path, tiny_dir):
    units = plan_units(load_grid_config(_config(tmp_path, tiny_dir)))
    assert [(u.method.name, u.train_bits, u.restore_levels) for u in units] == [
        ("lora", 16, (16,)), ("rtn", 4, (4, 8, 16)), ("rtn", 2, (2, 8, 16))]
    from restora.experiments.grid import _cells

    # the loftq restore mode only applies to LoftQ-initialised units
    assert [c[2] for c in _cells(units[1], ["plain", "loftq"])] == ["sql-rtn-4b-s0-l4", "sql-rtn-4b-s0-l8", "sql-rtn-4b-s0-l16"]
    lq = plan_units(load_grid_config(_config(tmp_path, tiny_dir)))[1]
    lq = type(lq)(lq.task, type(lq.method)("lq", "rtn", (4,), "loftq"), 4, 0, (4, 16))
    assert [c[2] for c in _cells(lq, ["plain", "loftq"])] == ["sql-lq-4b-s0-l4", "sql-lq-4b-s0-l16", "sql-lq-4b-s0-l16-loftq"]


def test_grid_runs_resumes_and_shards_agree(tmp_path, tiny_dir, capsys):
    cfg = _config(tmp_path, tiny_dir)
    full = tmp_path / "full"
    assert main(["grid", str(cfg), "--out", str(full)]) == 0
    cells = json.loads((full / "results.json").read_text())
    assert len(cells) == 7 and (full / "table.md").is_file() and (full / "results.csv").is_file()
    assert (full / "plr.png").stat().st_size > 1000
    table = (full / "table.md").read_text()
    assert "16-bit LoRA" in table and "rtn 4b → PLR16" in table
    modes = (full / "modes.md").read_text().splitlines()
    assert "own k-bit base" in modes[0] and "PLR16" in modes[0] and len(modes) == 2 + 3  # header, rule, 3 adapters
    rtn4 = next(line for line in modes if "| rtn 4b |" in line)
    want = next(c for c in cells if c["unit"] == "sql-rtn-4b-s0" and c["restore_bits"] == 4)["test_log_loss"]
    assert f"{want:.3f}" in rtn4
    # one adapter per unit, shared by all its restore levels
    assert len(list((full / "adapters").iterdir())) == 3
    # the rtn method's own [train] override reached its units only
    steps = {p.name: json.loads((p / "restora.json").read_text())["metrics"]["steps"] for p in (full / "adapters").iterdir()}
    assert steps == {"sql-lora-16b-s0": 2, "sql-rtn-4b-s0": 1, "sql-rtn-2b-s0": 1}
    assert {c["unit"]: c["train_overrides"] for c in cells}["sql-rtn-4b-s0"] == {"max_steps": 1}
    # rerun: everything is skipped (no training, no evaluation)
    mtimes = {p: p.stat().st_mtime_ns for p in (full / "cells").glob("*.json")}
    capsys.readouterr()
    assert main(["grid", str(cfg), "--out", str(full)]) == 0
    assert "0 cells to evaluate" in capsys.readouterr().out
    assert mtimes == {p: p.stat().st_mtime_ns for p in (full / "cells").glob("*.json")}
    # two shards into one folder, then --collect: same results as the unsharded run
    sharded = tmp_path / "sharded"
    assert main(["grid", str(cfg), "--out", str(sharded), "--shard", "0/2"]) == 0
    assert len(list((sharded / "cells").glob("*.json"))) < 7
    assert main(["grid", str(cfg), "--out", str(sharded), "--shard", "1/2"]) == 0
    assert main(["grid", str(cfg), "--out", str(sharded), "--collect"]) == 0

    def key(cells):
        return sorted((c["unit"], c["restore_bits"], round(c["test_log_loss"], 5),
                       json.dumps(c["metrics"], sort_keys=True)) for c in cells)

    assert key(json.loads((sharded / "results.json").read_text())) == key(cells)


def test_grid_eval_compile(tmp_path, tiny_dir):
    """[eval] compile = true: the cells decode through compiled steps, and say so."""
    cfg = tmp_path / "grid.toml"
    rtn = '[[methods]]\nname = "rtn"\nformat = "rtn"\nbits = [4, 2]\ntrain = { max_steps = 1 }\n'
    text = CONFIG.format(model=tiny_dir)
    assert rtn in text
    cfg.write_text(text.replace(rtn, "").replace("[eval]", "[eval]\ncompile = true"))  # the 16-bit method only
    assert main(["grid", str(cfg), "--out", str(tmp_path / "g")]) == 0
    cells = json.loads((tmp_path / "g" / "results.json").read_text())
    assert cells and all(c["compiled_decoding"] for c in cells)


def test_shard_from_slurm(monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    assert parse_shard(None) == (3, 4)
    assert parse_shard("1/2") == (1, 2)
    with pytest.raises(ValueError, match="must look like i/n"):
        parse_shard("x")


def test_malformed_config_names_the_key(tmp_path, tiny_dir):
    p = tmp_path / "bad.toml"
    p.write_text(CONFIG.format(model=tiny_dir).replace("max_steps = 2", "max_stepz = 2"))
    with pytest.raises(ValueError, match="unknown key train.'max_stepz'"):
        load_grid_config(p)
    p.write_text(CONFIG.format(model=tiny_dir).replace("train = { max_steps = 1 }", "train = { epochz = 1 }"))
    with pytest.raises(ValueError, match="unknown key methods\\[1\\].train.'epochz'"):
        load_grid_config(p)
    p.write_text(CONFIG.format(model=tiny_dir).replace('name = "rtn"', 'name = "lora"'))
    with pytest.raises(ValueError, match="'lora' is used twice"):
        load_grid_config(p)
    p.write_text(CONFIG.format(model=tiny_dir).replace('tasks = ["sql"]', ""))
    with pytest.raises(ValueError, match="key 'tasks' is missing"):
        load_grid_config(p)


def test_plot_has_one_column_per_restoration_mode(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    from restora.experiments.report import _modes, _plot

    cells = []
    for mode, loss in (("plain", 0.6), ("bias-correct", 0.55), ("mean-match", 0.5), ("auto", 0.5)):
        for k in (3, 4):
            for level in (k, 16):
                if mode != "plain" and level == k:
                    continue  # only plain cells exist at the adapter's own base
                cells.append({"task": "sql", "method": "gptq", "train_bits": k, "restore_bits": level,
                              "restore_mode": mode, "test_log_loss": loss + k / 100})
    cells.append({"task": "sql", "method": "lora", "train_bits": 16, "restore_bits": 16, "test_log_loss": 0.4})
    assert _modes(cells) == ["plain", "bias-correct", "mean-match"]  # auto picks among them: not a column
    _plot(cells, tmp_path / "plr.png")
    width, height = Image.open(tmp_path / "plr.png").size
    assert width == 3 * 550 and height == 400  # 3 mode columns x 1 (task, metric) row at 100 dpi


def test_table_gives_auto_one_column_whatever_level_it_chose():
    from restora.experiments.report import markdown_table

    def cell(task, bits, mode, loss, seed=0):
        return {"task": task, "method": "gptq", "train_bits": 4, "restore_bits": bits, "restore_mode": mode,
                "seed": seed, "test_log_loss": loss, "metrics": {"exact_match": {"value": 0.5}} if task == "sql" else {}}

    cells = [cell("sql", 4, "plain", 0.5), cell("sql", 16, "plain", 0.6), cell("sql", 16, "mean-match", 0.45),
             cell("sql", 8, "auto", 0.4), cell("sql", 16, "auto", 0.2, seed=1), cell("gsm8k", 4, "plain", 0.9)]
    lines = markdown_table(cells).splitlines()
    header = lines[0].split(" | ")
    assert sum(h.startswith("4b QLoRA → auto") for h in header) == 1 and header[-1] == "4b QLoRA → auto |"
    assert "4b QLoRA → PLR16 mean-match" in header
    sql_loss = next(line for line in lines if line.startswith("| sql | log loss"))
    assert sql_loss.endswith("| 0.300 |")  # the two seeds' auto cells averaged, though they chose 8 and 16
    assert not any(line.startswith("| gsm8k | exact_match") for line in lines)  # no metric row a task lacks


def test_priority_order_alternates_tasks_and_takes_method_overrides(tmp_path, tiny_dir):
    text = CONFIG.format(model=tiny_dir).replace('tasks = ["sql"]', 'tasks = ["sql", "gsm8k"]')
    text = text.replace('bits = [4, 2]\n', 'bits = [4, 2]\nseeds = [0, 1]\n')
    text += '\n[[methods]]\nname = "rtn"\nformat = "rtn"\nbits = [3]\ntasks = ["sql"]\ntrain = { max_steps = 1 }\n'
    p = tmp_path / "g.toml"
    p.write_text(text)
    units = [u.id for u in plan_units(load_grid_config(p))]
    assert units == ["sql-lora-16b-s0", "gsm8k-lora-16b-s0",
                     "gsm8k-rtn-4b-s0", "sql-rtn-4b-s0", "sql-rtn-2b-s0", "gsm8k-rtn-2b-s0",
                     "gsm8k-rtn-4b-s1", "sql-rtn-4b-s1", "sql-rtn-2b-s1", "gsm8k-rtn-2b-s1",
                     "sql-rtn-3b-s0"]  # shard 0/2 and 1/2 each get both tasks in turn
    p.write_text(text.replace("bits = [3]", "bits = [4]"))
    with pytest.raises(ValueError, match="'rtn' is used twice for task sql at 4 bits, seed 0"):
        load_grid_config(p)
    # one task's runs may come before another's: an entry may repeat bits and seeds for tasks not yet run
    p.write_text(text.replace('bits = [4, 2]\n', 'bits = [4, 2]\ntasks = ["sql"]\n', 1)
                 .replace('bits = [3]\ntasks = ["sql"]', 'bits = [4]\ntasks = ["gsm8k"]'))
    assert [u.id for u in plan_units(load_grid_config(p))][-2:] == ["sql-rtn-2b-s1", "gsm8k-rtn-4b-s0"]
    # the same bits again under another seed is a later-priority run of the same method
    p.write_text(text.replace("bits = [3]", "bits = [4]\nseeds = [2]"))
    assert [u.id for u in plan_units(load_grid_config(p))][-1] == "sql-rtn-4b-s2"
    p.write_text(text.replace("bits = [3]", "bits = [4]\nseeds = [2]\neval = { limit = 3 }"))
    with pytest.raises(ValueError, match="repeats bits of an entry with other eval settings"):
        load_grid_config(p)
    # a bad value fails when the config loads, naming the unit, not when the unit's turn comes
    p.write_text(text.replace("train = { max_steps = 1 }", "train = { max_steps = 1.5 }"))
    with pytest.raises(ValueError, match="g.toml: gsm8k-rtn-4b-s0: training setting 'max_steps' must be a whole number"):
        load_grid_config(p)


def test_trained_arm_merges_and_per_row_numbers(tmp_path, tiny_dir):
    """The study's cells: the dequantized-base arm, non-plain modes only at mode_bits, merged scores per dtype,
    per-task settings, and per-row numbers that add up to the cell's log loss."""
    from restora.experiments.grid import _cells

    text = CONFIG.format(model=tiny_dir).replace("bits = [4, 2]", 'bits = [4]\neval = { merge_dtypes = ["float32", "bfloat16"], merge_limit = 5 }')
    text = text.replace("limit = 6", "limit = 4\nloss_limit = { sql = 7 }\nrestore_modes = [\"plain\", \"trained\", \"bias-correct\"]"
                                     "\nmode_bits = [16]")
    cfg = tmp_path / "g.toml"
    cfg.write_text(text)
    unit = plan_units(load_grid_config(cfg))[1]
    assert [c[2] for c in _cells(unit, ["plain", "trained", "bias-correct"], [16])] == [
        "sql-rtn-4b-s0-l4", "sql-rtn-4b-s0-l4-trained", "sql-rtn-4b-s0-l8", "sql-rtn-4b-s0-l16",
        "sql-rtn-4b-s0-l16-bias-correct"]
    assert main(["grid", str(cfg), "--out", str(tmp_path / "g")]) == 0
    cells = {c.name[:-5]: json.loads(c.read_text()) for c in (tmp_path / "g" / "cells").glob("*.json")}
    assert sorted(cells) == ["sql-lora-16b-s0-l16", "sql-rtn-4b-s0-l16", "sql-rtn-4b-s0-l16-bias-correct",
                             "sql-rtn-4b-s0-l4", "sql-rtn-4b-s0-l4-trained", "sql-rtn-4b-s0-l8"]
    for c in cells.values():
        assert len(c["row_losses"]) == 7 and len(c["row_scores"]) == 4
        assert sum(s for s, _ in c["row_losses"]) / sum(n for _, n in c["row_losses"]) == pytest.approx(c["test_log_loss"], rel=1e-4)
    trained, plr16 = cells["sql-rtn-4b-s0-l4-trained"], cells["sql-rtn-4b-s0-l16"]
    assert trained["restore_format"] == "float" and trained["restore_mode"] == "trained"
    assert trained["scoring"]["max_new_tokens"] == 4 and trained["scoring"]["split"] == "test"  # how it was scored
    assert sorted(trained["merged_log_loss"]) == sorted(plr16["merged_log_loss"]) == ["bfloat16", "float32"]
    assert all(len(rows) == 5 for c in (trained, plr16) for rows in c["merged_row_losses"].values())
    assert not cells["sql-rtn-4b-s0-l8"]["merged_log_loss"] and not cells["sql-lora-16b-s0-l16"]["merged_log_loss"]
    study = (tmp_path / "g" / "study.md").read_text()
    assert "| rtn 4-bit |" in study and "| dequantized k-bit base | 5 |" in study


def test_shipped_configs_load():
    from pathlib import Path

    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.toml"))
    assert configs
    for p in configs:
        assert plan_units(load_grid_config(p)), p
