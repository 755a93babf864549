"""restora's cache folder: converted models, cached quantized bases and built native kernels live under it."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """$RESTORA_CACHE, else ~/.cache/restora."""
    return Path(os.environ.get("RESTORA_CACHE", Path.home() / ".cache" / "restora"))
