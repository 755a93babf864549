"""Reading a JSON object from a file with one-line errors that name the file: the manifests, adapter configs,
provenance and trainer states restora reads all go through `read_json_object`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["read_json_object"]


def read_json_object(path: Path, missing: str = ": no such file") -> dict[str, Any]:
    """The JSON object in `path`; FileNotFoundError (PATH + `missing`) or ValueError naming the file and the fault."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}{missing}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (not UTF-8 text at byte {e.start})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise ValueError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value
