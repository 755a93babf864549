"""Serving: an OpenAI-compatible HTTP API over one base and many LoRA adapters (`restora serve`).

app.py (FastAPI endpoints), engine.py (continuous batching across adapters),
adapters_root.py (safe adapter names, LRU residency), server.py (builds the app for a model, a budget and an
adapter root). The command itself is restora.commands.serving.
"""
