"""Grid reports: results.json / results.csv, a Table-1-style markdown table, and plr.png.

Table layout follows the PLR report's Table 1: one row per task and metric, and columns
`16-bit LoRA | kb QLoRA | PLRl ...` for each train bit-width k (highest first), where
"kb QLoRA" is the adapter on its own k-bit base and PLRl the same adapter on an l-bit
base. Methods other than the 16-bit baseline get their name in the column header.
`modes_table` (modes.md) turns it around for comparing restoration modes: one row per adapter
(task, method, k), its test log loss on its own base and at each (l, mode), the best in bold,
and what `auto` chose. The plot shows, per task, the main metric and the test log loss against restore bits:
one line per (method, train bits), the 16-bit LoRA as a dashed reference.
"""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from restora.core.atomic import write_text_atomic

__all__ = ["write_reports", "main_metric", "markdown_table", "modes_table"]

_PREFERRED = ("execution_match", "accuracy", "exact_match")


def main_metric(cells: list[dict[str, Any]]) -> str | None:
    names = {k for c in cells for k in c.get("metrics", {})}
    return next((m for m in _PREFERRED if m in names), None)


_PER_ROW = ("row_losses", "row_scores", "merged_row_losses")  # per-test-row data: in the cell files, for paired statistics only


def _flat(cell: dict[str, Any]) -> dict[str, Any]:
    row = {k: v for k, v in cell.items() if k not in ("metrics", "examples", "merged_log_loss") + _PER_ROW}
    for dtype, loss in (cell.get("merged_log_loss") or {}).items():
        row[f"merged_{dtype}_log_loss"] = loss
    for name, est in cell.get("metrics", {}).items():
        row[name] = est["value"]
        row[f"{name}_ci95_low"] = est["ci95_low"]
        row[f"{name}_ci95_high"] = est["ci95_high"]
    return row


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _value(cell: dict[str, Any], metric: str) -> float | None:
    if metric == "test_log_loss":
        return cell["test_log_loss"]
    est = cell.get("metrics", {}).get(metric)
    return None if est is None else est["value"]


def _level(cell: dict[str, Any]) -> Any:
    """Restore level key: the bits, "BITS MODE" for a restoration mode other than plain, or "auto": auto picks its
    own bits per adapter, so its cells share one column (and seeds average) whatever level each chose."""
    mode = cell.get("restore_mode", "plain")
    if mode == "auto":
        return "auto"
    return cell["restore_bits"] if mode == "plain" else f"{cell['restore_bits']} {mode}"


def _bits(level: Any) -> int:
    """Sort position of a level key: its bits; auto after every level."""
    if level == "auto":
        return 17
    return level if isinstance(level, int) else int(str(level).split()[0])


def markdown_table(cells: list[dict[str, Any]]) -> str:
    """Seed-000-style table: accuracy-like metrics in %, log loss in nats/token; seeds averaged."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    metrics = [m for m in ("execution_match", "exact_match", "accuracy") if any(m in c.get("metrics", {}) for c in cells)]
    metrics.append("test_log_loss")
    for c in cells:
        for m in metrics:
            v = _value(c, m)
            if v is not None:
                groups[(c["task"], m, c["method"], c["train_bits"], _level(c))].append(v)
    columns = sorted({key[2:] for key in groups}, key=lambda t: (t[1] != 16, -t[1], t[0], _bits(t[2]), str(t[2])))

    def header(method: str, k: int, level: Any) -> str:
        if k == 16:
            return "16-bit LoRA" if method in ("lora", "lora16", "float") else f"{method} 16-bit"
        own = f"{k}b QLoRA" if method in ("gptq", "qlora") else f"{method} {k}b"
        if level == k:
            return own
        if level == "auto":
            return f"{own} → auto"
        if isinstance(level, int):
            return f"{own} → PLR{level}"
        bits, mode = str(level).split(" ", 1)
        return f"{own} → PLR{bits} {mode}"

    lines = ["| task | metric | " + " | ".join(header(*col) for col in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for task in sorted({key[0] for key in groups}):
        for m in metrics:
            vals = []
            for method, k, level in columns:
                v = groups.get((task, m, method, k, level))
                if not v:
                    vals.append("")
                elif m == "test_log_loss":
                    vals.append(f"{_mean(v):.3f}")
                else:
                    vals.append(f"{100 * _mean(v):.1f}")
            if not any(vals):
                continue  # a metric this task does not report
            label = "log loss (nats/token)" if m == "test_log_loss" else f"{m} (%)"
            lines.append(f"| {Path(task).stem} | {label} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


_MODE_ORDER = ("plain", "bias-correct", "partial", "partial+bias", "mean-match", "loftq")


def modes_table(cells: list[dict[str, Any]]) -> str:
    """Test log loss per adapter (rows) and restore level × mode (columns); seeds averaged."""
    rows: dict[tuple[str, str, int], dict[Any, list[float]]] = defaultdict(lambda: defaultdict(list))
    chosen: dict[tuple[str, str, int], str] = {}
    for c in cells:
        key = (Path(c["task"]).stem, c["method"], c["train_bits"])
        mode = c.get("restore_mode", "plain")
        if mode == "auto":
            rows[key]["auto"].append(c["test_log_loss"])
            chosen[key] = str((c.get("restoration") or {}).get("chosen", ""))
        elif c["restore_bits"] == c["train_bits"] and mode == "plain":
            rows[key]["own"].append(c["test_log_loss"])
        else:
            rows[key][(c["restore_bits"], mode)].append(c["test_log_loss"])
    levels = sorted({col for r in rows.values() for col in r if isinstance(col, tuple)},
                    key=lambda t: (t[0], _MODE_ORDER.index(t[1]) if t[1] in _MODE_ORDER else len(_MODE_ORDER), t[1]))
    cols: list[Any] = ["own", *levels, "auto"]

    def label(col: Any) -> str:
        if col == "own":
            return "own k-bit base"
        if col == "auto":
            return "auto"
        return f"PLR{col[0]}" + ("" if col[1] == "plain" else f" {col[1]}")

    lines = ["| task | adapter | " + " | ".join(label(c) for c in cols) + " | auto's choice |",
             "|---|---|" + "---|" * (len(cols) + 1)]
    for key in sorted(rows, key=lambda k: (k[0], k[1], -k[2])):
        vals = {c: _mean(rows[key][c]) for c in cols if rows[key].get(c)}
        best = min(vals.values()) if vals else None
        cells_ = [("" if c not in vals else f"**{vals[c]:.3f}**" if vals[c] == best else f"{vals[c]:.3f}") for c in cols]
        name = f"{key[1]} {key[2]}b" if key[2] != 16 else f"{key[1]} 16-bit"
        lines.append(f"| {key[0]} | {name} | " + " | ".join(cells_) + f" | {chosen.get(key, '')} |")
    return "\n".join(lines) + "\n"


def _modes(cells: list[dict[str, Any]]) -> list[str]:
    """Restoration modes to plot, one column each: plain first ("auto" picks among the others)."""
    found = {c.get("restore_mode", "plain") for c in cells} - {"auto", "plain"}
    return ["plain", *sorted(found)]


def _plot(cells: list[dict[str, Any]], path: Path) -> None:
    """One panel per (task, metric) row and restoration-mode column; a line per adapter (method, k)."""
    import matplotlib  # a dependency; imported here because only reports draw (it costs ~0.3 s to import)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({c["task"] for c in cells})
    metric = main_metric(cells)
    panels = [(task, m) for task in tasks for m in ([metric] if metric else []) + ["test_log_loss"]]
    modes = _modes(cells)
    adapters = sorted({(c["method"], c["train_bits"]) for c in cells if c["train_bits"] != 16}, key=lambda a: (-a[1], a[0]))
    cmap = plt.get_cmap("tab10" if len(adapters) <= 10 else "tab20")  # tab10: no look-alike neighbours
    colour = {a: cmap(i % cmap.N) for i, a in enumerate(adapters)}  # one colour per adapter, every panel
    fig, axes = plt.subplots(len(panels), len(modes), figsize=(5.5 * len(modes), 4 * len(panels)), squeeze=False,
                             sharey="row")
    for r, (task, m) in enumerate(panels):
        # (method, k) -> restore bits -> values, per mode; the plain cell at l = k is every mode's start
        by_mode: dict[str, dict[tuple[str, int], dict[int, list[float]]]] = defaultdict(
            lambda: defaultdict(lambda: defaultdict(list)))
        for c in cells:
            v = _value(c, m)
            if c["task"] == task and v is not None:
                by_mode[c.get("restore_mode", "plain")][(c["method"], c["train_bits"])][c["restore_bits"]].append(
                    v if m == "test_log_loss" else 100 * v)
        for col, mode in enumerate(modes):
            ax = axes[r][col]
            lines = by_mode[mode]
            for key, own in by_mode["plain"].items():
                if key[1] in own and key in lines:
                    lines[key].setdefault(key[1], own[key[1]])
            for (method, k), pts in sorted(by_mode["plain"].items(), key=lambda kv: -kv[0][1]):
                if k == 16:  # the 16-bit adapter: a reference in every panel
                    ax.axhline(_mean(pts[16]), color="black", linestyle="--", label=f"{method} 16-bit (reference)")
            for (method, k), pts in sorted(lines.items(), key=lambda kv: -kv[0][1]):
                if k != 16:
                    xs = sorted(pts)
                    ax.plot(xs, [_mean(pts[x]) for x in xs], marker="o", color=colour[(method, k)],
                            label=f"{method} trained at {k} bits")
            ax.set_xlabel("restore bits l (base precision at inference)")
            ax.set_ylabel("test log loss (nats/token)" if m == "test_log_loss" else f"{m} (%)")
            ax.set_xscale("log", base=2)
            ax.set_xticks([2, 3, 4, 8, 16], labels=["2", "3", "4", "8", "16"])
            ax.set_title(f"{Path(task).stem}, {mode}: {'log loss' if m == 'test_log_loss' else m}")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_reports(cells: list[dict[str, Any]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    compact = [{k: v for k, v in c.items() if k not in _PER_ROW} for c in cells]
    write_text_atomic(out / "results.json", json.dumps(compact, indent=2, default=str) + "\n")
    rows = [_flat(c) for c in cells]
    fields = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("task", "method", "train_bits", "restore_bits", "seed"), k))
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(out / "results.csv", text.getvalue())
    write_text_atomic(out / "table.md", markdown_table(cells))
    write_text_atomic(out / "modes.md", modes_table(cells))
    _plot(cells, out / "plr.png")
