"""Inference: batched greedy generation (generate.py) on a lean static-cache decoder (decode.py) with prompt
lookup drafts (lookup.py); task evaluation (evaluate.py) and perplexity (perplexity.py)."""
