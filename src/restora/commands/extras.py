"""Optional dependencies: import one, or fail in one line that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXTRAS", "missing_module_message", "require"]

# Top-level modules of the optional dependencies (pyproject's [project.optional-dependencies]) -> their extra.
EXTRAS = {"fastapi": "serve", "uvicorn": "serve", "starlette": "serve", "gguf": "gguf", "peft": "peer",
          "bitsandbytes": "peer", "openai": "test"}


def require(module: str, extra: str) -> ModuleType:
    """Import `module`, or raise RuntimeError naming `pip install 'restora[extra]'`."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError:
        raise RuntimeError(f"{module} is not installed: pip install 'restora[{extra}]'") from None


def missing_module_message(error: ModuleNotFoundError) -> str:
    """One line for a module that is not installed: the extra that brings it, or the package itself."""
    name = (error.name or str(error)).split(".")[0]
    extra = EXTRAS.get(name)
    if extra:
        return f"{name} is not installed: pip install 'restora[{extra}]'"
    return f"{name} is not installed: pip install {name}"
