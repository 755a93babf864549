"""Optional dependencies: import one, or fail in one line that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, extra: str) -> ModuleType:
    """Import `module`, or raise RuntimeError naming `pip install 'restora[extra]'`."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError:
        raise RuntimeError(f"{module} is not installed: pip install 'restora[{extra}]'") from None
