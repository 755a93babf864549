"""Serving: an OpenAI-compatible HTTP API over one base and many LoRA adapters (restora serve).

app.py (FastAPI endpoints), engine.py (continuous batching across adapters),
adapters_root.py (safe adapter names, LRU residency), command.py (the `serve` command).
"""

from .command import build_server, serve

__all__ = ["serve", "build_server"]
