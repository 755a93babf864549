"""Quantized checkpoints: a folder that loads back into a working model without the source.

    DIR/
      config.json, tokenizer files      as Hugging Face writes them
      model.safetensors                 float parts (embeddings, norms, head) + packed codes/scales
      restora_manifest.json             provenance, sizes and checksums (below)

The manifest records the source model id and the hash of its float weights, the
QuantSpec, the calibration set, restora's version, per-layer formats, storage sizes and
the held-out perplexity measured at quantization time, and `files`: the size and sha256 of
every other file in the folder, computed right after writing it. `read_manifest` checks the
sizes (cheap; a truncated file is a one-line error), `verify_files` the checksums too
(`restora info`); a manifest without `files` still loads. Everything is written to a
temporary folder first and renamed into place (restora.core.atomic), so a failed or killed
run leaves the previous checkpoint or the new one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from torch import nn

from restora import __version__
from restora.core.atomic import atomic_dir, recover
from restora.core.jsonfile import read_json_object
from restora.core.modules import unique_state_dict
from restora.core.safetensors_file import write_file
from restora.quant.linear import QuantLinear
from restora.quant.spec import QuantSpec

__all__ = ["save_quantized", "read_manifest", "storage_sizes", "check_source_hash", "check_safetensors", "verify_files",
           "file_sha256", "MANIFEST", "WEIGHTS"]

MANIFEST = "restora_manifest.json"
WEIGHTS = "model.safetensors"


def storage_sizes(model: nn.Module) -> dict[str, int]:
    """Bytes of quantized linear layers, of the rest, and what the linears take in bf16."""
    q_bytes = bf16_equiv = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            q_bytes += m.qweight.nbytes() + (m.bias.numel() * m.bias.element_size() if m.bias is not None else 0)
            bf16_equiv += 2 * m.in_features * m.out_features
    total = sum(t.numel() * t.element_size() for t in unique_state_dict(model).values())
    return {
        "quantized_linear_bytes": q_bytes,
        "quantized_linear_bf16_bytes": bf16_equiv,
        "other_bytes": total - q_bytes,
        "total_bytes": total,
    }


def save_quantized(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | Path,
    spec: QuantSpec,
    provenance: dict[str, Any],
) -> Path:
    """Write model + manifest atomically to `out_dir` (replacing an older checkpoint there)."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    layers = {
        name: {**m.qweight.meta(), "out_features": m.out_features, "in_features": m.in_features, "bias": m.bias is not None}
        for name, m in model.named_modules()
        if isinstance(m, QuantLinear)
    }
    manifest = {
        "restora_version": __version__,
        **provenance,
        "quantization": spec.to_dict(),
        "sizes": storage_sizes(model),
        "layers": layers,
    }
    with atomic_dir(out) as tmp:
        write_file(unique_state_dict(model), tmp / WEIGHTS, metadata={"format": "pt", "restora": __version__})
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        manifest["files"] = {p.relative_to(tmp).as_posix(): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
                             for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def check_safetensors(path: Path) -> None:
    """One-line error unless `path` is a whole safetensors file: a readable header, and exactly as many bytes
    as the header's tensors need (a truncated or padded file fails)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            header = json.loads(f.read(n)) if 0 < n <= size - 8 else None
        if not isinstance(header, dict):
            raise ValueError("its header is cut off")
        end = 8 + n + max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a safetensors file ({e}): expected a header and tensors, got {size} bytes") from None
    if size != end:
        raise ValueError(f"{path}: {size} bytes, its header describes {end}: the file is truncated or corrupt")


def _check_sizes(folder: Path, manifest: dict[str, Any]) -> None:
    for name, rec in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the manifest records it ({rec.get('bytes')} bytes)")
        size = path.stat().st_size
        if size != rec.get("bytes"):
            raise ValueError(f"{path}: {size} bytes, the manifest records {rec.get('bytes')}: truncated or changed")


def verify_files(folder: Path, manifest: dict[str, Any] | None = None) -> int:
    """Check every file the manifest records: size and sha256; returns how many (0: no checksums recorded,
    and then the weights file is still checked to be a whole safetensors file). One-line error on a mismatch."""
    folder = recover(folder)
    manifest = manifest if manifest is not None else read_manifest(folder)
    files = manifest.get("files")
    if not files:
        if not (folder / WEIGHTS).is_file():
            raise FileNotFoundError(f"{folder / WEIGHTS} is missing")
        check_safetensors(folder / WEIGHTS)
        return 0
    _check_sizes(folder, manifest)
    for name, rec in files.items():
        got = file_sha256(folder / name)
        if got != rec.get("sha256"):
            raise ValueError(f"{folder / name}: sha256 {got[:16]}..., the manifest records "
                             f"{str(rec.get('sha256'))[:16]}...: the file was changed or corrupted")
    return len(files)


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a checkpoint folder, its fields and the recorded file sizes checked (one-line errors)."""
    folder = recover(folder)
    path = folder / MANIFEST
    manifest = read_json_object(path, " is missing: not a restora quantized checkpoint")
    for key in ("quantization", "layers", "source_hash"):
        if key not in manifest:
            raise ValueError(f"{path}: field {key!r} is missing")
    if not isinstance(manifest["layers"], dict):
        raise ValueError(f"{path}: field 'layers' is {type(manifest['layers']).__name__}: expected an object")
    files = manifest.get("files")
    if files is not None and not (isinstance(files, dict) and all(isinstance(r, dict) for r in files.values())):
        raise ValueError(f"{path}: field 'files' is malformed: expected {{name: {{bytes, sha256}}}}")
    _check_sizes(folder, manifest)
    return manifest


def check_source_hash(manifest: dict[str, Any], expected: str, where: str = "checkpoint") -> None:
    """One-line error if a checkpoint was quantized from a different source model."""
    got = manifest.get("source_hash")
    if got != expected:
        raise ValueError(f"{where} was made from source weights {got}, but the model given has {expected}")
