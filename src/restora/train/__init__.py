"""Training adapters on a frozen (quantized) base: the recipe (recipe.py: base, adapter, data, provenance), the
loop (loop.py: completion-only SFT, best validation epoch, resumable checkpoints), 8-bit AdamW (optim8bit.py),
and data parallelism (distributed.py: DDP, fsdp.py: FSDP2)."""

from restora.train.loop import TrainConfig
from restora.train.recipe import train_adapter

__all__ = ["TrainConfig", "train_adapter"]
