"""restora: LoRA fine-tuning on quantized bases, and Post LoRA Restoration."""

__version__ = "0.1.0"
