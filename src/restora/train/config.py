"""The training settings, in four typed groups shared by `restora train`, the grid's [train] table and the Python
API: the base (BaseSettings), the adapter (LoRASettings), the rows (DataSettings) and the optimization
(TrainConfig). Each field's default and its doc live here once; the CLI makes one flag per field (restora.cli),
the grid maps its flat keys onto the groups (`group_settings`). Values are checked on construction.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from restora.core.settings import settings_from

__all__ = ["Base", "BaseSettings", "DataSettings", "LoRASettings", "SETTING_GROUPS", "TrainConfig", "group_settings"]

Base = Literal["float", "nf4", "fp4", "int8", "rtn", "gptq"]


@dataclass(frozen=True)
class BaseSettings:
    """The base the adapter trains on (QLoRA: a quantized one).

    Args:
        format: training base format (float = no quantization).
        bits: training base bits k.
        group_size: quantization group size (-1: one scale per row).
        calib_samples: GPTQ calibration rows (train split).
    """

    format: Base = "nf4"
    bits: int = 4
    group_size: int = 64
    calib_samples: int = 500

    def __post_init__(self) -> None:
        if self.group_size <= 0 and self.group_size != -1:
            raise ValueError(f"group_size must be positive, or -1 for one scale per row, got {self.group_size}")
        if self.calib_samples < 0:
            raise ValueError(f"calib_samples must be 0 or more, got {self.calib_samples}")


@dataclass(frozen=True)
class LoRASettings:
    """The adapter's shape and initialisation ((IA)³ uses only targets).

    Args:
        rank: LoRA rank r.
        alpha: LoRA alpha (scaling alpha/r, or alpha/sqrt(r) with --rslora).
        dropout: LoRA dropout.
        rslora: use rsLoRA scaling alpha/sqrt(r).
        targets: attn (q,k,v,o), all (every linear layer incl. MLP), comma-separated names, or a regex.
        init: LoRA init: default (Kaiming A, B=0), gaussian, or loftq (quantize and init jointly).
        loftq_iters: LoftQ alternating steps T.
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    rslora: bool = False
    targets: str = "all"
    init: Literal["default", "gaussian", "loftq"] = "default"
    loftq_iters: int = 5

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ValueError(f"rank must be positive, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.init not in ("default", "gaussian", "loftq"):
            raise ValueError(f"init must be default, gaussian or loftq, got {self.init!r}")
        if self.loftq_iters <= 0:
            raise ValueError(f"loftq_iters must be positive, got {self.loftq_iters}")
        if not self.targets:
            raise ValueError("targets must name modules: attn, all, comma-separated names or a regex")


@dataclass(frozen=True)
class DataSettings:
    """Which rows train and validate, and how they are encoded.

    Args:
        max_samples: use at most this many training rows (0 = all).
        val_samples: validation rows for the per-epoch validation loss.
        max_len: token cap per example.
        chat: use the tokenizer's chat template around prompts.
    """

    max_samples: int = 0
    val_samples: int = 200
    max_len: int = 384
    chat: bool = False

    def __post_init__(self) -> None:
        if self.max_samples < 0 or self.val_samples < 0:
            raise ValueError(f"max_samples and val_samples must be 0 or more, got {self.max_samples}, {self.val_samples}")
        if self.max_len <= 0:
            raise ValueError(f"max_len must be positive, got {self.max_len}")


@dataclass(frozen=True)
class TrainConfig:
    """The optimization (defaults follow the PLR protocol where it has one).

    Args:
        epochs: passes over the training rows (the PLR protocol uses up to 10 and keeps the best; ignored when
            max_steps > 0).
        max_steps: stop after this many optimizer steps (0 = all epochs).
        lr: peak learning rate of AdamW.
        batch_size: effective batch (rows per optimizer step).
        micro_batch_size: rows per forward pass; must divide batch_size. auto: the largest that fits
            --memory-budget by restora's memory planner (`restora plan --mode train`), base loading included.
        memory_budget: with --micro-batch-size auto: memory the run may use, e.g. 20GiB (default: what the
            machine has available now).
        schedule: learning-rate schedule after warmup (constant or cosine).
        warmup_ratio: fraction of steps for linear warmup.
        weight_decay: AdamW weight decay on adapter parameters.
        optimizer: adamw (fp32 moments), adamw8bit (blockwise 8-bit moments), paged_adamw8bit (bitsandbytes, CUDA).
        bf16: bf16 autocast compute (fast on CPUs with AMX/AVX512-BF16).
        grad_checkpointing: recompute activations in backward to save memory.
        compile: torch.compile the decoder blocks while training (about 2x faster on SmolLM2 on CPU, after a
            one-time compile of ~40 s); auto = on for models of 50M+ parameters, off under --parallel fsdp, and
            off for a quantized base whose dequantized weights (which compiled blocks keep for the backward)
            would pass 2 GiB: past about 1B parameters, eager training keeps only the codes.
        save_every: optimizer steps between resumable checkpoints (0 = never).
        seed: seed of the splits, data order and adapter init.
        max_grad_norm: clip the adapter gradient norm (0 = no clipping).
        eager_attention: on CPU, train with eager attention (faster backward than SDPA here).
    """

    epochs: int = 1
    max_steps: int = 0
    lr: float = 2e-4
    batch_size: int = 32
    micro_batch_size: int | Literal["auto"] = 8
    memory_budget: str | None = None
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    optimizer: Literal["adamw", "adamw8bit", "paged_adamw8bit"] = "adamw"
    bf16: bool = True
    grad_checkpointing: bool = False
    compile: Literal["auto", "on", "off"] = "auto"
    save_every: int = 1
    seed: int = 0
    max_grad_norm: float = 1.0
    eager_attention: bool = True

    def __post_init__(self) -> None:
        micro = self.micro_batch_size
        if micro != "auto" and (not isinstance(micro, int) or isinstance(micro, bool) or micro <= 0):
            raise ValueError(f"micro_batch_size must be a positive number or auto, got {micro!r}")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if micro != "auto" and self.batch_size % micro:
            raise ValueError(f"micro_batch_size {micro} does not divide batch_size {self.batch_size}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be constant or cosine, got {self.schedule!r}")
        if self.optimizer not in ("adamw", "adamw8bit", "paged_adamw8bit"):
            raise ValueError(f"optimizer must be adamw, adamw8bit or paged_adamw8bit, got {self.optimizer!r}")
        if self.compile not in ("auto", "on", "off"):
            raise ValueError(f"compile must be auto, on or off, got {self.compile!r}")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ValueError("set epochs > 0 or max_steps > 0")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")

    def resume_key(self) -> dict[str, Any]:
        """Settings that must match for --resume to be meaningful."""
        d = asdict(self)
        for k in ("save_every", "eager_attention", "compile", "memory_budget"):  # speed and memory, not semantics
            d.pop(k)
        return d


# train_adapter's groups of settings, by its parameter names
SETTING_GROUPS: dict[str, type] = {"base": BaseSettings, "lora": LoRASettings, "data": DataSettings, "optim": TrainConfig}


def group_settings(flat: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Flat settings (a grid's [train] table, field names as keys) as train_adapter's groups of settings. An unknown
    key, or a value of the wrong type (a whole number, a flag, a word), is a one-line error naming the key and
    `where` it came from; a whole number where a float is expected is taken as that float."""
    owner = {f.name: group for group, cls in SETTING_GROUPS.items() for f in fields(cls)}
    for key in flat:
        if key not in owner:
            raise ValueError(f"{where}unknown training setting {key!r}: expected one of {', '.join(sorted(owner))}")
    return {group: settings_from(cls, {k: v for k, v in flat.items() if owner[k] == group}, where, "training setting")
            for group, cls in SETTING_GROUPS.items()}
