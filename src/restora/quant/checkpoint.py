"""Quantized checkpoints: a folder that loads back into a working model without the source.

    DIR/
      config.json, tokenizer files      as Hugging Face writes them
      model.safetensors                 float parts (embeddings, norms, head) + packed codes/scales
      restora_manifest.json             provenance and sizes (below)

The manifest records the source model id and the hash of its float weights, the
QuantSpec, the calibration set, restora's version, per-layer formats, storage sizes and
the held-out perplexity measured at quantization time. Everything is written to a
temporary folder first and renamed into place, so a failed run leaves nothing behind.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from restora import __version__
from restora.core.atomic import atomic_dir
from restora.core.safetensors_file import write_file
from restora.quant.linear import QuantLinear
from restora.quant.spec import QuantSpec

__all__ = ["save_quantized", "read_manifest", "storage_sizes", "check_source_hash", "MANIFEST", "WEIGHTS"]

MANIFEST = "restora_manifest.json"
WEIGHTS = "model.safetensors"


def _unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with tied tensors stored once (safetensors refuses shared storage)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.numel())
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().contiguous()
    return out


def storage_sizes(model: nn.Module) -> dict[str, int]:
    """Bytes of quantized linear layers, of the rest, and what the linears take in bf16."""
    q_bytes = bf16_equiv = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            q_bytes += m.qweight.nbytes() + (m.bias.numel() * m.bias.element_size() if m.bias is not None else 0)
            bf16_equiv += 2 * m.in_features * m.out_features
    total = sum(t.numel() * t.element_size() for t in _unique_state_dict(model).values())
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
        write_file(_unique_state_dict(model), tmp / WEIGHTS, metadata={"format": "pt", "restora": __version__})
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: not a restora quantized checkpoint") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    for key in ("quantization", "layers", "source_hash"):
        if key not in manifest:
            raise ValueError(f"{path}: field {key!r} is missing")
    return manifest


def check_source_hash(manifest: dict[str, Any], expected: str, where: str = "checkpoint") -> None:
    """One-line error if a checkpoint was quantized from a different source model."""
    got = manifest.get("source_hash")
    if got != expected:
        raise ValueError(f"{where} was made from source weights {got}, but the model given has {expected}")
