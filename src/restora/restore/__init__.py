"""Post LoRA Restoration: put a k-bit-trained adapter on an l-bit base (plr.py), restoration modes and their
corrections (modes.py, corrections.py, loftq.py), `restored` (adapter.py), and export to vLLM/SGLang/HF
(export.py). Which l fits the memory is restora.plan's answer."""

from restora.restore.adapter import restored
from restora.restore.plr import restore_base

__all__ = ["restore_base", "restored"]
