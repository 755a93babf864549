"""Serving: an OpenAI-compatible HTTP API over one base and many LoRA adapters (`restora serve`).

app.py (FastAPI endpoints), requests.py (request bodies checked into typed requests), responses.py (OpenAI's
response and stream formats), errors.py (API errors), engine.py (continuous batching across adapters),
adapters_root.py (safe adapter names, LRU residency), server.py (builds the app for a model, a budget and an
adapter root). The command itself is restora.commands.serving.
"""
