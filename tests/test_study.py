"""The study's statistics on synthetic cells: paired bootstrap, seeds, gap closed, tables and plots."""

from __future__ import annotations

import numpy as np
import pytest

from restora.experiments.study import arm_of, compare, study_markdown, write_study

ROWS = 120


def _cell(method, k, level, mode="plain", seed=0, losses=None, correct=None, task="sql", targets="attn", **extra):
    per_token = losses if losses is not None else BASE
    row_losses = [[float(p * n), int(n)] for p, n in zip(per_token, _COUNTS)]
    cell = {"task": task, "method": method, "train_bits": k, "restore_bits": level, "restore_mode": mode,
            "seed": seed, "targets": targets, "row_losses": row_losses, "init": "default", "train_format": "gptq",
            "test_log_loss": sum(s for s, _ in row_losses) / sum(n for _, n in row_losses)}
    if correct is not None:
        cell["row_scores"] = [{"execution_match": float(c), "exact_match": float(c)} for c in correct]
    cell.update(extra)
    return cell


_COUNTS = np.random.default_rng(7).integers(5, 40, ROWS)
BASE = np.random.default_rng(3).uniform(0.3, 0.7, ROWS)


def test_arm_names():
    assert arm_of(_cell("g", 4, 4)) == "own"
    assert arm_of(_cell("g", 4, 4, "trained")) == "dequantized"
    assert arm_of(_cell("g", 4, 16)) == "PLR 16"
    assert arm_of(_cell("g", 4, 16, "mean-match")) == "mean-match 16"
    assert arm_of(_cell("g", 4, 8, "auto")) == "auto"


def test_identical_arms_differ_by_zero_and_are_noise():
    a = _cell("g", 4, 4, losses=BASE)
    c = compare([(a, dict(a))])
    assert c.value == 0 and c.low == 0 and c.high == 0 and not c.resolved


def test_a_shift_on_every_token_is_exact_and_resolved():
    own = _cell("g", 4, 4, losses=BASE)
    better = _cell("g", 4, 16, losses=BASE - 0.05)
    c = compare([(better, own)])
    assert c.value == pytest.approx(-0.05) and c.resolved
    assert c.low == pytest.approx(-0.05) and c.high == pytest.approx(-0.05)  # no row-to-row variation in the shift
    # a noisy difference centred on zero is not resolved; its interval covers the point estimate
    noise = np.random.default_rng(0).normal(0, 0.05, ROWS)
    c = compare([(_cell("g", 4, 16, losses=BASE + noise - noise.mean()), own)])
    assert c.low < 0 < c.high and not c.resolved


def test_the_token_weighted_difference_matches_the_cells_log_losses():
    own = _cell("g", 4, 4, losses=BASE)
    other = _cell("g", 4, 16, losses=BASE * 0.9 + np.linspace(0, 0.1, ROWS))
    c = compare([(other, own)])
    assert c.value == pytest.approx(other["test_log_loss"] - own["test_log_loss"])
    assert c.low <= c.value <= c.high


def test_cells_on_different_rows_are_refused():
    own = _cell("g", 4, 4, losses=BASE)
    short = dict(own, row_losses=own["row_losses"][:-1])
    with pytest.raises(ValueError, match="same test rows"):
        compare([(short, own)])


def test_seeds_average_and_report_their_spread():
    pairs = [(_cell("g", 4, 16, seed=s, losses=BASE - d), _cell("g", 4, 4, seed=s, losses=BASE)) for s, d in ((0, 0.02), (1, 0.04))]
    c = compare(pairs)
    assert c.value == pytest.approx(-0.03)
    assert c.seeds == pytest.approx((-0.02, -0.04))


def test_accuracy_difference():
    own = _cell("g", 4, 4, losses=BASE, correct=[1] * 30 + [0] * 90)
    plr = _cell("g", 4, 16, losses=BASE, correct=[1] * 60 + [0] * 60)
    c = compare([(plr, own)], "accuracy")
    assert c.value == pytest.approx(0.25) and c.resolved
    assert compare([(_cell("g", 4, 16, losses=BASE), own)], "accuracy") is None  # no generation: no comparison


def _study(own_extra=0.2, restored_extra=0.1):
    ref = _cell("lora", 16, 16, losses=BASE)
    own = _cell("g", 3, 3, losses=BASE + own_extra)
    plr = _cell("g", 3, 16, losses=BASE + restored_extra)
    deq = _cell("g", 3, 3, "trained", losses=BASE + own_extra)
    deq["merged_row_losses"] = {"float32": deq["row_losses"], "bfloat16": [[s + 0.01 * n, n] for s, n in deq["row_losses"]]}
    deq["merged_log_loss"] = {"float32": deq["test_log_loss"], "bfloat16": deq["test_log_loss"] + 0.01}
    return [ref, own, plr, deq]


def deq_loss(extra):
    return _cell("g", 3, 3, losses=BASE + extra)["test_log_loss"]


def test_gap_closed_is_the_fraction_of_the_qlora_gap():
    text = study_markdown(_study(0.2, 0.1))
    gap = next(line for line in text.splitlines() if "| log loss |" in line)
    assert "| 50% [50, 50] |" in gap  # PLR 16 halves the gap on every row
    assert "| 0% [0, 0] |" in gap  # the dequantized base is the own base
    assert "## Merged weights by storage dtype" in text
    merge = next(line for line in text.splitlines() if "| dequantized k-bit base |" in line)
    assert f"| {ROWS} | {deq_loss(0.2):.4f} | +0.0100 [+0.0100, +0.0100] **worse** |" in merge


def test_gap_closed_in_accuracy():
    cells = [_cell("lora", 16, 16, correct=[1] * 90 + [0] * 30), _cell("g", 3, 3, correct=[1] * 30 + [0] * 90),
             _cell("g", 3, 16, correct=[1] * 60 + [0] * 60)]
    gap = next(line for line in study_markdown(cells).splitlines() if "| accuracy |" in line)
    assert "| 50% [" in gap


def test_an_arm_equal_to_the_own_base_closes_none_of_a_small_gap():
    # a gap resolved but small enough that some bootstrap draws hold no gap at all (0/0 there)
    own = [1] * 60 + [0] * 60
    cells = [_cell("lora", 16, 16, correct=[1] * 65 + [0] * 55), _cell("g", 3, 3, correct=own),
             _cell("g", 3, 16, mode="auto", correct=own)]
    gap = next(line for line in study_markdown(cells).splitlines() if "| accuracy |" in line)
    assert "nan" not in gap and "| 0% [0, 0] |" in gap


def test_no_gap_no_fraction():
    text = study_markdown(_study(0.0, -0.1))
    gap = next(line for line in text.splitlines() if "| log loss |" in line)
    assert "no resolved gap: own − 16-bit LoRA = +0.0000" in gap and "%" not in gap  # nothing to close


def test_write_study_draws_a_plot_per_task_and_the_steps_plot(tmp_path):
    pytest.importorskip("matplotlib")
    cells = _study()
    for steps, gain in ((16, 0.02), (48, 0.06)):
        name = f"g-steps{steps}"
        cells += [_cell(name, 3, 3, losses=BASE + 0.2, train_steps=steps),
                  _cell(name, 3, 16, losses=BASE + 0.2 - gain, train_steps=steps)]
    for c in cells:
        c.setdefault("train_steps", 64)
    written = write_study(cells, tmp_path)
    names = sorted(p.name for p in written)
    assert names == ["steps-sql-3b.png", "study-sql.png", "study.md"]
    assert all(p.stat().st_size > 1000 for p in written)


def test_rows_that_cannot_be_scored_are_left_out_of_both_arms():
    own = _cell("g", 4, 4, correct=[1] * 30 + [0] * 90)
    plr = _cell("g", 4, 16, correct=[1] * 60 + [0] * 60)
    for c in (own, plr):
        for s in c["row_scores"][:30]:
            s["execution_match"] = None  # the reference query of these rows does not execute
    c = compare([(plr, own)], "accuracy")
    assert c.value == pytest.approx(30 / 90)


def test_accuracy_marks_higher_as_better():
    own = _cell("g", 4, 4, correct=[1] * 30 + [0] * 90)
    plr = _cell("g", 4, 16, correct=[1] * 60 + [0] * 60)
    ref = _cell("lora", 16, 16, correct=[1] * 30 + [0] * 90)
    text = study_markdown([ref, own, plr])
    line = next(x for x in text.splitlines() if x.startswith("| g 4-bit |") and "+25.0" in x)
    assert "**better**" in line
    assert "no resolved gap: own − 16-bit LoRA = +0.0" in text  # own equals the reference in accuracy
