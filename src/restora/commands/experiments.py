"""Commands for experiments: the PLR grid, and the offline demo (a small grid on SmolLM2 × SQL)."""

from __future__ import annotations

from pathlib import Path

from restora.experiments import grid as g

__all__ = ["grid", "demo", "DEMO_CONFIG"]

# The demo grid: 16-bit LoRA, GPTQ QLoRA at 4 and 3 bits, each restored to 16 bits: plain PLR16
# and PLR16 with bias correction (restora.restore.modes).
# Sizes are chosen to finish in about 15 minutes on 2 CPU cores (see README).
DEMO_CONFIG = """
model = "smollm2-135m"
tasks = ["sql"]
seeds = [0]
restore_bits = [16]

[[methods]]
name = "lora"
format = "float"
bits = [16]

[[methods]]
name = "gptq"
format = "gptq"
bits = [4, 3]

[train]
rank = 16
alpha = 32
targets = "attn"
epochs = 1
lr = 1e-3
batch_size = 16
micro_batch_size = 8
max_samples = 160
val_samples = 48
max_len = 256
calib_samples = 128

[eval]
split = "test"
limit = 60
max_new_tokens = 48
batch_size = 16
restore_modes = ["plain", "mean-match"]
"""


def grid(config: str, *, out: str, shard: str | None = None, collect: bool = False) -> int:
    """Run the PLR grid in CONFIG (TOML): methods × train bits × restore bits × tasks × seeds.

    Args:
        config: grid config file (see restora.experiments.grid for the keys).
        out: results folder (adapters/, cells/, results.csv, results.json, table.md, plr.png).
        shard: run only shard i/n (0-based); default from SLURM_ARRAY_TASK_ID/COUNT or PBS_ARRAY_INDEX.
        collect: only merge finished cells (e.g. from all shards) into the tables and plot.
    """

    cfg = g.load_grid_config(config)
    if not collect:
        g.run_grid(cfg, out, g.parse_shard(shard))
    cells = g.collect(out)
    print((Path(out) / "table.md").read_text())
    print(f"{len(cells)} cells; wrote {out}/results.csv, results.json, table.md, plr.png")
    return 0


def demo(out: str = "runs/demo", data_dir: str | None = None) -> int:
    """The embedded default, offline: a small PLR grid on SmolLM2-135M × SQL Create Context.

    Args:
        out: results folder (rerunning resumes and skips finished cells).
        data_dir: folder laid out like ../shared/data (else $RESTORA_DATA_DIR, else the hub).
    """
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    text = DEMO_CONFIG if data_dir is None else DEMO_CONFIG.replace('seeds = [0]', f'seeds = [0]\ndata_dir = "{data_dir}"')
    (folder / "demo.toml").write_text(text)
    return grid(str(folder / "demo.toml"), out=out)
