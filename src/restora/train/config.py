"""The training settings (TrainConfig): checked on construction, with the subset a resumed run must repeat."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["TrainConfig"]


@dataclass
class TrainConfig:
    """Training settings (defaults follow the PLR protocol where it has one).

    epochs: passes over the training rows (ignored when max_steps > 0).
    max_steps: stop after this many optimizer steps (0 = run all epochs).
    lr: peak learning rate of AdamW.
    batch_size: effective batch in rows per optimizer step.
    micro_batch_size: rows per forward/backward; must divide batch_size.
    schedule: "constant" or "cosine", both after linear warmup.
    warmup_ratio: fraction of all steps spent warming up.
    weight_decay: AdamW weight decay on adapter parameters.
    optimizer: "adamw" (fp32 moments), "adamw8bit" (blockwise 8-bit moments) or
        "paged_adamw8bit" (bitsandbytes, CUDA only).
    bf16: run the forward/backward under bf16 autocast (fast on CPUs with AMX/AVX512-BF16).
    grad_checkpointing: recompute decoder activations in the backward pass.
    save_every: optimizer steps between resumable checkpoints (0 = never).
    seed: seed of data order and adapter init.
    max_grad_norm: clip the adapter gradient norm (0 = no clipping).
    eager_attention: on CPU, train with eager attention (faster backward than SDPA here).
    compile: compile the decoder blocks with torch.compile while training (restora.kernels.compiled);
        not with FSDP.
    """

    epochs: int = 1
    max_steps: int = 0
    lr: float = 2e-4
    batch_size: int = 32
    micro_batch_size: int = 8
    schedule: str = "constant"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    bf16: bool = True
    grad_checkpointing: bool = False
    save_every: int = 1
    seed: int = 0
    max_grad_norm: float = 1.0
    eager_attention: bool = True
    compile: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.batch_size <= 0 or self.micro_batch_size <= 0:
            raise ValueError(f"batch_size and micro_batch_size must be positive, got {self.batch_size}, {self.micro_batch_size}")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"micro_batch_size {self.micro_batch_size} does not divide batch_size {self.batch_size}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be constant or cosine, got {self.schedule!r}")
        if self.optimizer not in ("adamw", "adamw8bit", "paged_adamw8bit"):
            raise ValueError(f"optimizer must be adamw, adamw8bit or paged_adamw8bit, got {self.optimizer!r}")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ValueError("set epochs > 0 or max_steps > 0")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")

    def resume_key(self) -> dict[str, Any]:
        """Settings that must match for --resume to be meaningful."""
        d = asdict(self)
        for k in ("save_every", "extra", "eager_attention", "compile"):  # speed, not semantics
            d.pop(k)
        return d
