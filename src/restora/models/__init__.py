"""Models: load one by alias, GGUF file, HF folder or hub id (load.py), a quantized checkpoint (quantized.py),
and the base at a chosen precision, quantized once and cached (bases.py)."""

from restora.models.load import load_model, resolve_source, source_hash
from restora.models.loaded import LoadedModel

__all__ = ["LoadedModel", "load_model", "resolve_source", "source_hash"]
