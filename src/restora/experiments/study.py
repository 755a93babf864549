"""The PLR study's statistics: paired comparisons over test rows, the seed spread, and the gap closed.

Every grid cell keeps per-row numbers (restora.infer.evaluate): each test row's summed completion loss
and label count, and each generated row's scores. All cells of one task are scored on the same test rows,
so a comparison of two arms is paired. The paired bootstrap draws the test rows with replacement, B times,
and recomputes the difference on each draw, both arms on the same rows:

    log loss     d = sum_i (s_i^A - s_i^B) / sum_i n_i        (s: a row's summed loss, n: its label count)
    accuracy     d = mean_i (c_i^A - c_i^B)                    (c: the row's correctness, 0 or 1)

Its 2.5th and 97.5th percentiles are the 95% interval. An interval that excludes 0 is "resolved"; one
that holds 0 is noise. With several seeds the per-row differences are averaged over seeds first (the
rows are the same), and the spread of the seeds' own point estimates is reported beside the interval.

Arms of a QLoRA adapter trained at k bits: `own` (its k-bit base), `dequantized` (the k-bit base in float:
`--base trained`, what merging into the dequantized base gives), `PLR l` (the base rebuilt at l > k bits),
`mean-match 16` and `auto`. The reference is the 16-bit LoRA with the same target modules.
Gap closed = (own - restored) / (own - LoRA16): 1 is the 16-bit LoRA's quality, 0 the own base's.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from restora.core.atomic import write_text_atomic

__all__ = ["BOOTSTRAP_DRAWS", "Comparison", "arm_of", "compare", "study_markdown", "write_study"]

BOOTSTRAP_DRAWS = 2000
_ACCURACY = {"sql": "execution_match", "gsm8k": "accuracy"}  # each task's headline generated-answer metric
_ORDER = ["own", "dequantized", "PLR 4", "PLR 8", "PLR 16", "mean-match 16", "auto"]


def arm_of(cell: dict[str, Any]) -> str:
    """The cell's arm: own, dequantized, PLR l, <mode> l, or auto."""
    if "merged_arm" in cell:
        return cell["merged_arm"]
    mode, level, k = cell.get("restore_mode", "plain"), cell["restore_bits"], cell["train_bits"]
    if mode == "trained":
        return "dequantized"
    if mode == "auto":
        return "auto"
    if mode == "plain":
        return "own" if level == k else f"PLR {level}"
    return f"{mode} {level}"


def _unit_key(cell: dict[str, Any]) -> tuple[str, str, int]:
    return cell["task"], cell["method"], cell["train_bits"]


def _task_name(cell: dict[str, Any]) -> str:
    return Path(cell["task"]).stem


def _losses(cell: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    rows = np.asarray(cell["row_losses"], dtype=np.float64)
    return rows[:, 0], rows[:, 1]


def _correct(cell: dict[str, Any]) -> np.ndarray | None:
    """Each generated row's correctness in the task's headline metric; NaN where the row cannot be scored (an SQL
    reference query that does not execute: a property of the row, so the same in every arm)."""
    metric = _ACCURACY.get(_task_name(cell))
    scores = cell.get("row_scores") or []
    if metric is None or not scores:
        return None
    return np.asarray([np.nan if s.get(metric) is None else float(s[metric]) for s in scores])


def _scored(*vectors: np.ndarray) -> list[np.ndarray]:
    """The vectors restricted to the rows every one of them scored."""
    keep = np.all([np.isfinite(v) for v in vectors], axis=0)
    return [v[keep] for v in vectors]


@dataclass(frozen=True)
class Comparison:
    """A minus B, averaged over seeds: the point estimate, its paired 95% interval, and each seed's estimate."""

    value: float
    low: float
    high: float
    seeds: tuple[float, ...]

    @property
    def resolved(self) -> bool:
        return self.low > 0 or self.high < 0


def _draws(n: int, seed: int, draws: int) -> np.ndarray:
    """(draws, n) resampling counts of n rows: row i is taken counts[b, i] times in draw b."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=draws).astype(np.float64)


def compare(pairs: list[tuple[dict[str, Any], dict[str, Any]]], metric: str = "log_loss",
            draws: int = BOOTSTRAP_DRAWS) -> Comparison | None:
    """Paired bootstrap of A minus B over test rows; `pairs` holds one (A, B) cell pair per seed."""
    if not pairs:
        return None
    if metric == "log_loss":
        parts = [(_losses(a), _losses(b)) for a, b in pairs]
        if any(len(sa) != len(sb) or not np.array_equal(na, nb) for (sa, na), (sb, nb) in parts):
            raise ValueError("compare: the two cells were not scored on the same test rows")
        diff = np.mean([sa - sb for (sa, _), (sb, _) in parts], axis=0)
        count = parts[0][0][1]
        seeds = tuple(float((sa - sb).sum() / count.sum()) for (sa, _), (sb, _) in parts)
        w = _draws(len(diff), 0, draws)
        boot = (w @ diff) / (w @ count)
        value = float(diff.sum() / count.sum())
    else:
        raw = [(_correct(a), _correct(b)) for a, b in pairs]
        if any(ca is None or cb is None or len(ca) != len(cb) for ca, cb in raw):
            return None
        flat = _scored(*[v for pair in raw for v in pair])  # type: ignore[misc]
        vectors = [(flat[2 * i], flat[2 * i + 1]) for i in range(len(raw))]
        diff = np.mean([ca - cb for ca, cb in vectors], axis=0)  # type: ignore[operator]
        seeds = tuple(float((ca - cb).mean()) for ca, cb in vectors)  # type: ignore[operator]
        boot = (_draws(len(diff), 1, draws) @ diff) / len(diff)
        value = float(diff.mean())
    low, high = np.percentile(boot, [2.5, 97.5])
    return Comparison(value, float(low), float(high), seeds)


def _pct(fraction: float) -> str:
    """A fraction as whole percent, with no negative zero."""
    return f"{round(100 * fraction) + 0:.0f}" if np.isfinite(fraction) else "nan"


def _gap_closed(own: list[dict[str, Any]], restored: list[dict[str, Any]], ref: dict[str, Any],
                metric: str, draws: int = BOOTSTRAP_DRAWS) -> tuple[float, float, float] | None:
    """(own - restored) / (own - ref) with its paired 95% interval; None where the gap is not resolved."""
    if metric == "log_loss":
        s_ref, count = _losses(ref)
        s_own = np.mean([_losses(c)[0] for c in own], axis=0)
        s_res = np.mean([_losses(c)[0] for c in restored], axis=0)
        w = _draws(len(count), 0, draws)
        num, den = w @ (s_own - s_res), w @ (s_own - s_ref)
        total = float((s_own - s_ref).sum())
        point = float((s_own - s_res).sum()) / total if total else float("nan")
    else:
        c_ref = _correct(ref)
        c_own = [_correct(c) for c in own]
        c_res = [_correct(c) for c in restored]
        if c_ref is None or any(c is None or len(c) != len(c_ref) for c in c_own + c_res):
            return None
        c_ref, *rest = _scored(c_ref, *c_own, *c_res)  # type: ignore[arg-type]
        m_own, m_res = np.mean(rest[: len(own)], axis=0), np.mean(rest[len(own) :], axis=0)
        w = _draws(len(c_ref), 1, draws)
        num, den = -(w @ (m_own - m_res)), -(w @ (m_own - c_ref))  # accuracy: higher is better, so the gap is ref - own
        total = float((c_ref - m_own).sum())
        point = float((m_res - m_own).sum()) / total if total else float("nan")
    lo, hi = np.percentile(den, [2.5, 97.5])
    if lo <= 0:  # the own base is not resolved worse than the 16-bit LoRA: no gap to close
        return None
    # draws whose gap is 0 have no fraction (0/0 where the arm equals the own base): they are left out
    ratio = np.divide(num, den, out=np.full(len(den), np.nan), where=den != 0)
    low, high = np.nanpercentile(ratio, [2.5, 97.5])
    return point, float(low), float(high)


class _Index:
    """Cells by (task, method, k) and arm, one per seed; and the 16-bit reference of each task and targets."""

    def __init__(self, cells: list[dict[str, Any]]) -> None:
        self.arms: dict[tuple[str, str, int], dict[str, dict[int, dict[str, Any]]]] = defaultdict(lambda: defaultdict(dict))
        for c in cells:
            if "row_losses" in c:
                self.arms[_unit_key(c)][arm_of(c)][c["seed"]] = c
        self.units = sorted((u for u in self.arms if u[2] < 16), key=lambda u: (u[0], -u[2], u[1]))

    def reference(self, task: str, targets: Any) -> dict[str, Any] | None:
        refs = [arms["own"][min(arms["own"])] for (t, _, k), arms in self.arms.items()
                if t == task and k == 16 and arms.get("own")]
        same = [c for c in refs if c.get("targets") == targets]
        return (same or refs or [None])[0]

    def pairs(self, unit: tuple[str, str, int], a: str, b: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        arms = self.arms[unit]
        return [(arms[a][s], arms[b][s]) for s in sorted(arms.get(a, {})) if s in arms.get(b, {})]

    def targets(self, unit: tuple[str, str, int]) -> Any:
        return next(iter(self.arms[unit]["own"].values())).get("targets") if self.arms[unit].get("own") else None


def _fmt(c: Comparison | None, scale: float, digits: int, higher_is_better: bool = False) -> str:
    if c is None:
        return ""
    mark = "" if not c.resolved else (" **better**" if (c.value > 0) == higher_is_better else " **worse**")
    spread = ""
    if len(c.seeds) > 1:
        spread = f"; seeds {' / '.join(f'{scale * v:+.{digits}f}' for v in c.seeds)}"
    return f"{scale * c.value:+.{digits}f} [{scale * c.low:+.{digits}f}, {scale * c.high:+.{digits}f}]{spread}{mark}"


def _arms(index: _Index, unit: tuple[str, str, int]) -> list[str]:
    present = set(index.arms[unit])
    return [a for a in _ORDER if a in present] + sorted(present - set(_ORDER))


def _unit_label(unit: tuple[str, str, int], index: _Index) -> str:
    seeds = sorted(index.arms[unit]["own"]) if index.arms[unit].get("own") else []
    return f"{unit[1]} {unit[2]}-bit" + (f" ({len(seeds)} seeds)" if len(seeds) > 1 else "")


def _delta_table(index: _Index, task: str, metric: str, against: str) -> list[str]:
    """Rows: adapters. Columns: each arm minus the own base (or minus the 16-bit LoRA)."""
    units = [u for u in index.units if u[0] == task]
    arms = [a for a in _ORDER if any(a in index.arms[u] for u in units) and (against == "lora16" or a != "own")]
    arms += sorted({a for u in units for a in index.arms[u]} - set(_ORDER))
    scale, digits = (1.0, 4) if metric == "log_loss" else (100.0, 1)
    lines = ["| adapter | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
    for u in units:
        ref = index.reference(task, index.targets(u))
        cells = []
        for a in arms:
            if a not in index.arms[u]:
                cells.append("")
            elif against == "own":
                cells.append(_fmt(compare(index.pairs(u, a, "own"), metric), scale, digits, metric != "log_loss"))
            elif ref is None:
                cells.append("")
            else:
                pairs = [(c, ref) for _, c in sorted(index.arms[u][a].items())]
                cells.append(_fmt(compare(pairs, metric), scale, digits, metric != "log_loss"))
        lines.append(f"| {_unit_label(u, index)} | " + " | ".join(cells) + " |")
    return lines


def _levels_table(index: _Index, task: str) -> list[str]:
    """Absolute numbers: log loss (and accuracy) of every arm, seeds averaged, with the 16-bit references."""
    units = [u for u in index.units if u[0] == task]
    arms = [a for a in _ORDER if any(a in index.arms[u] for u in units)]
    arms += sorted({a for u in units for a in index.arms[u]} - set(_ORDER))
    lines = ["| adapter | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
    refs = [(u, index.arms[u]["own"]) for u in index.arms if u[0] == task and u[2] == 16 and index.arms[u].get("own")]
    for u, by_seed in sorted(refs):
        lines.append(f"| {u[1]} (16-bit LoRA) | {_absolute(list(by_seed.values()))} |" + " |" * (len(arms) - 1))
    for u in units:
        row = [_absolute(list(index.arms[u][a].values())) if a in index.arms[u] else "" for a in arms]
        auto = index.arms[u].get("auto")
        if auto:
            chosen = sorted({f"{c['restore_bits']}" for c in auto.values()})
            row[arms.index("auto")] += f" (chose {'/'.join(chosen)})"
        lines.append(f"| {_unit_label(u, index)} | " + " | ".join(row) + " |")
    return lines


def _absolute(cells: list[dict[str, Any]]) -> str:
    loss = np.mean([c["test_log_loss"] for c in cells])
    acc = [_correct(c) for c in cells]
    text = f"{loss:.4f}"
    if acc and all(a is not None for a in acc):
        text += f" ({100 * np.mean([np.nanmean(a) for a in acc]):.1f}%)"  # type: ignore[arg-type]
    return text


def _gap_table(index: _Index, task: str) -> list[str]:
    units = [u for u in index.units if u[0] == task]
    arms = [a for a in _ORDER[1:] if any(a in index.arms[u] for u in units)]
    lines = ["| adapter | metric | " + " | ".join(arms) + " |", "|---|---|" + "---|" * len(arms)]
    for u in units:
        ref = index.reference(task, index.targets(u))
        if ref is None:
            continue
        for metric, name in (("log_loss", "log loss"), ("accuracy", "accuracy")):
            row = []
            for a in arms:
                seeds = [s for s in index.arms[u].get(a, {}) if s in index.arms[u]["own"]]
                g = _gap_closed([index.arms[u]["own"][s] for s in seeds], [index.arms[u][a][s] for s in seeds], ref,
                                metric) if seeds else None
                row.append("" if g is None else f"{_pct(g[0])}% [{_pct(g[1])}, {_pct(g[2])}]")
            if any(row):
                lines.append(f"| {_unit_label(u, index)} | {name} | " + " | ".join(row) + " |")
            else:
                gap = compare([(c, ref) for c in index.arms[u]["own"].values()], metric)
                own_worse = gap is not None and gap.resolved and (gap.value > 0) == (metric == "log_loss")
                if gap is not None and not own_worse:  # (own worse: a gap, and no restored arm scored yet)
                    scale, digits = (1.0, 4) if metric == "log_loss" else (100.0, 1)
                    lines.append(f"| {_unit_label(u, index)} | {name} | no resolved gap: own − 16-bit LoRA = "
                                 f"{_fmt(gap, scale, digits, metric != 'log_loss')} |" + " |" * (len(arms) - 1))
    return lines


def _merged_arms(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each cell's merged-weight scores as cells of their own, arm "<arm> merged <dtype>" (log loss only)."""
    out = []
    for c in cells:
        for dtype, rows in (c.get("merged_row_losses") or {}).items():
            out.append({**c, "row_losses": rows, "row_scores": [], "merged_row_losses": {}, "restore_mode": "merged",
                        "merged_arm": f"{arm_of(c)} merged {dtype}", "test_log_loss": c["merged_log_loss"][dtype]})
    return out


def _merge_table(cells: list[dict[str, Any]]) -> list[str]:
    """The merge's storage rounding: the adapter folded into dense weights (into the dequantized k-bit base, or
    into the 16-bit source: PLR 16), stored in bf16 or fp16 against float32 storage, all computed in float32 on
    the same rows; paired 95% intervals, seeds averaged."""
    virtual = _merged_arms(cells)
    if not virtual:
        return []
    index = _Index(virtual)
    lines = ["| task | adapter | merged into | rows | float32 | bfloat16 − float32 | float16 − float32 |",
             "|---|---|---|---|---|---|---|"]
    for u in index.units:
        for into, label in (("dequantized", "dequantized k-bit base"), ("PLR 16", "16-bit source (PLR 16)")):
            ref = f"{into} merged float32"
            if ref not in index.arms[u]:
                continue
            first = next(iter(index.arms[u][ref].values()))
            loss = np.mean([c["test_log_loss"] for c in index.arms[u][ref].values()])
            diffs = [_fmt(compare(index.pairs(u, f"{into} merged {d}", ref)), 1.0, 4)
                     if f"{into} merged {d}" in index.arms[u] else "" for d in ("bfloat16", "float16")]
            lines.append(f"| {Path(u[0]).stem} | {_unit_label(u, index)} | {label} | {len(first['row_losses'])} | "
                         f"{loss:.4f} | " + " | ".join(diffs) + " |")
    return lines


def study_markdown(cells: list[dict[str, Any]]) -> str:
    """The study's tables: absolute numbers; each arm against the own base and against the 16-bit LoRA (paired
    95% intervals, seeds averaged); the gap closed; and merged-weight log losses per dtype."""
    index = _Index(cells)
    out: list[str] = []
    for task in sorted({u[0] for u in index.arms}):
        name = Path(task).stem
        out += [f"## {name}", "", "Test log loss (nats/token), with accuracy in brackets, seeds averaged:", ""]
        out += _levels_table(index, task) + [""]
        if not any(u[0] == task for u in index.units):
            continue  # no quantized adapter of this task yet: nothing to compare
        for metric, title, unit in (("log_loss", "log loss", "nats/token"), ("accuracy", _ACCURACY.get(name, "accuracy"),
                                                                              "points")):
            out += [f"Each arm minus the own base, {title} ({unit}), paired 95% interval:", ""]
            out += _delta_table(index, task, metric, "own") + [""]
            out += [f"Each arm minus the 16-bit LoRA, {title} ({unit}), paired 95% interval:", ""]
            out += _delta_table(index, task, metric, "lora16") + [""]
        out += ["Gap closed, (own - restored) / (own - 16-bit LoRA), with its 95% interval (blank: no resolved gap):",
                ""]
        out += _gap_table(index, task) + [""]
    merge = _merge_table(cells)
    if merge:
        out += ["## Merged weights by storage dtype", "", "Test log loss of the adapter folded into dense weights and"
                " stored in float32, and what storing the merged weights in bfloat16 or float16 changes (all computed"
                " in float32, on the first rows of the test split; paired 95% interval):", ""] + merge + [""]
    return "\n".join(out)


def _pyplot() -> Any:
    import matplotlib  # a dependency; imported here because only reports draw (it costs ~0.3 s to import)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_task(index: _Index, task: str, path: Path) -> None:
    plt = _pyplot()
    units = [u for u in index.units if u[0] == task and "own" in index.arms[u]]
    if not units:
        return
    cols = min(4, len(units))
    rows = -(-len(units) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, u in zip(axes.flat, units):
        own = float(np.mean([c["test_log_loss"] for c in index.arms[u]["own"].values()]))
        k = u[2]
        ref = index.reference(task, index.targets(u))
        if ref is not None:
            ax.axhline(ref["test_log_loss"], color="grey", linestyle="--", label="16-bit LoRA")
        ax.axhline(own, color="black", linewidth=0.8)
        ax.plot([k], [own], marker="o", color="black", linestyle="none", label=f"own {k}-bit base")
        series = [("PLR", [a for a in index.arms[u] if a.startswith("PLR ")], "tab:blue", "o", 0.0),
                  ("dequantized", ["dequantized"], "tab:orange", "s", -0.25),
                  ("mean-match", [a for a in index.arms[u] if a.startswith("mean-match ")], "tab:green", "^", 0.25),
                  ("auto", ["auto"], "tab:red", "D", 0.5)]
        for label, arms, color, marker, dx in series:
            xs, ys, lo, hi = [], [], [], []
            for a in sorted((a for a in arms if a in index.arms[u]), key=lambda a: int(a.split()[-1]) if a[-1].isdigit() else 0):
                c = compare(index.pairs(u, a, "own"))
                if c is None:
                    continue
                bits = [cell["restore_bits"] for cell in index.arms[u][a].values()]
                xs.append(float(np.mean(bits)) if a != "dequantized" else k)
                ys.append(own + c.value)
                lo.append(-(c.low - c.value))
                hi.append(c.high - c.value)
            if xs:
                ax.errorbar([x + dx for x in xs], ys, yerr=[lo, hi], color=color, marker=marker, capsize=3,
                            linestyle="-" if label == "PLR" else "none", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks([2, 3, 4, 8, 16])
        ax.set_xticklabels(["2", "3", "4", "8", "16"])
        ax.set_title(_unit_label(u, index), fontsize=9)
        ax.set_xlabel("base bits l")
        ax.set_ylabel("test log loss")
    for ax in list(axes.flat)[len(units):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{Path(task).stem}: test log loss by base bits\n(bars: paired 95% interval of the difference "
                 "from the own base)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_steps(index: _Index, task: str, bits: int, path: Path) -> bool:
    """Restoration gain (own - restored log loss) against training steps, for the attention GPTQ adapters at k."""
    plt = _pyplot()
    points = []
    for u in index.units:
        if u[0] != task or u[2] != bits or "own" not in index.arms[u]:
            continue
        first = next(iter(index.arms[u]["own"].values()))
        if first.get("train_format") != "gptq" or first.get("targets") != "attn" or first.get("init") != "default":
            continue
        steps = first.get("train_steps")
        if steps:
            points.append((steps, u))
    if len(points) < 2:
        return False
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for arm, color in (("PLR 16", "tab:blue"), ("mean-match 16", "tab:green"), ("dequantized", "tab:orange")):
        xs, ys, lo, hi = [], [], [], []
        for steps, u in sorted(points):
            c = compare(index.pairs(u, "own", arm)) if arm in index.arms[u] else None
            if c is not None:
                xs.append(steps)
                ys.append(c.value)
                lo.append(c.value - c.low)
                hi.append(c.high - c.value)
        if xs:
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, color=color, label=arm)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training steps")
    ax.set_ylabel("gain: own - restored log loss")
    ax.set_title(f"{Path(task).stem}, {bits}-bit GPTQ, attention LoRA: gain against training length", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_study(cells: list[dict[str, Any]], out: Path) -> list[Path]:
    """study.md and the plots (study-TASK.png, steps-TASK-kb.png) from cells that carry per-row numbers."""
    if not any("row_losses" in c for c in cells):
        return []
    index = _Index(cells)
    written = [out / "study.md"]
    write_text_atomic(out / "study.md", study_markdown(cells))
    for task in sorted({u[0] for u in index.arms}):
        path = out / f"study-{Path(task).stem}.png"
        _plot_task(index, task, path)
        written.append(path)
        for bits in sorted({u[2] for u in index.units if u[0] == task}):
            steps = out / f"steps-{Path(task).stem}-{bits}b.png"
            if _plot_steps(index, task, bits, steps):
                written.append(steps)
    return written
