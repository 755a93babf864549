"""Load a restora quantized checkpoint folder (restora.quant.checkpoint) back into a working model.

Each quantized layer is rebuilt as a QuantLinear of the manifest's format, on meta, and takes the file's codes
and scales; the float parts take the file's tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from restora.core.modules import set_module
from restora.models.loaded import LoadedModel
from restora.models.stream import CheckpointFiles, parameters_on_meta
from restora.quant.base import QuantizedWeight
from restora.quant.checkpoint import MANIFEST, WEIGHTS, check_source_hash, read_manifest
from restora.quant.linear import QuantLinear, empty_weight

__all__ = ["load_quantized"]


def load_quantized(folder: str | Path, dtype: torch.dtype | None = None, expected_source_hash: str | None = None,
                   mapped: bool = False):
    """Rebuild a model from a quantized checkpoint folder. Returns a restora LoadedModel.

    The model is built on meta (restora.models.stream) and every tensor of the file is assigned in place of its
    stand-in: nothing is initialised and then overwritten, so the peak is the checkpoint's own size. Float parts
    (embeddings, norms, head, biases) are held in `dtype` (default: as stored, the source's dtype); the formats'
    codes and scales as stored. `mapped`
    leaves the codes and scales views of the file, paged in when read (offloading: restora.models.offload).
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    if expected_source_hash is not None:
        check_source_hash(manifest, expected_source_hash, str(folder))
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing")
    files = CheckpointFiles(folder)
    config = AutoConfig.from_pretrained(folder)
    if dtype is None:  # the float parts' stored dtype (the quantized layers' fp16 scales do not count)
        layer_of = {n: n.split(".qweight.", 1)[0] for n in files.names()}  # a quantized layer's tensors
        kinds = [files.dtype(n) for n in files.names() if layer_of[n] not in manifest["layers"]
                 and not n.endswith(".bias") and files.dtype(n) is not None]
        dtype = max(set(kinds), key=kinds.count) if kinds else torch.float32
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, meta in manifest["layers"].items():
        for field in ("out_features", "in_features"):
            if not isinstance(meta.get(field), int):
                raise ValueError(f"{folder / MANIFEST}: layer {name}: field {field!r} is missing or not an integer")
        with torch.device("meta"):
            qw = empty_weight(meta["out_features"], meta["in_features"], meta)
            bias = torch.empty(meta["out_features"], dtype=dtype) if meta.get("bias") else None
        set_module(model, name, QuantLinear(qw, bias))
    state = model.state_dict(keep_vars=True)
    unexpected = [n for n in files.names() if n not in state]
    if unexpected:
        raise ValueError(f"{weights}: tensors do not match the manifest (unexpected {unexpected[:3]})")
    quantized = {id(t) for m in model.modules() if isinstance(m, QuantizedWeight) for t in m.buffers()}
    for name in files.names():
        t = files.get(name, mapped=mapped)
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        old = state[name]
        if tuple(old.shape) != tuple(t.shape):
            raise ValueError(f"{weights}: {name} has shape {tuple(t.shape)}, the manifest's layer expects "
                             f"{tuple(old.shape)} (do the manifest's bits and group size match the tensors?)")
        if id(old) in quantized:
            if t.dtype != old.dtype:
                raise ValueError(f"{weights}: {name} is {t.dtype}, the manifest's format stores {old.dtype}")
        elif t.is_floating_point():
            t = t.to(dtype)
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(t, requires_grad=old.requires_grad)
        else:
            module._buffers[attr] = t
    files.close()
    model.tie_weights()
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise ValueError(f"{weights}: tensors do not match the manifest (missing {missing[:3]})")
    model.eval()
    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return LoadedModel(
        model=model,
        tokenizer=tok,
        source=manifest.get("source", str(folder)),
        source_hash=manifest["source_hash"],
        folder=folder,
        manifest=manifest,
    )
