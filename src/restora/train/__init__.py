"""Training adapters on a frozen (quantized) base: the recipe (recipe.py: base, adapter, data, provenance), its
settings (config.py), the completion-only loss (loss.py), one optimizer step (step.py), resumable checkpoints
(checkpoint.py), the loop (loop.py: epochs, validation, the best epoch kept), 8-bit AdamW (optim8bit.py), and
data parallelism (distributed.py: DDP, fsdp.py: FSDP2)."""

from restora.train.config import BaseSettings, DataSettings, LoRASettings, TrainConfig
from restora.train.recipe import train_adapter

__all__ = ["BaseSettings", "DataSettings", "LoRASettings", "TrainConfig", "train_adapter"]
