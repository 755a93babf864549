"""Export an adapter for vLLM and SGLang: a clean PEFT LoRA folder, or the model merged at l bits.

LoRA's serving promise (LoRA Without Regret) is one base in memory and many adapters batched over it;
vLLM and SGLang do that at GPU scale (`vllm serve BASE --enable-lora --lora-modules name=path`).
PLR maps onto them directly: serve the adapter on the highest-precision base the
GPUs fit, not on the k-bit base it was trained on. Two ways out:

    export_peft        adapter_config.json + adapter_model.safetensors, the config naming the
                       *source* model (the 16-bit base: PLR16) and only PEFT's own fields;
                       restora.json (provenance) stays beside them, servers ignore it.
                       vLLM serves LoRA only, so (IA)³, DoRA, LoRA biases, modules_to_save
                       and ranks above vLLM's 512 are refused with a one-line error.
    export_merged_hf   W = deq(W^(l)) + s·BA folded into dense weights: a plain transformers
                       folder (any serving stack loads it) whose numbers are those of the
                       adapter on the l-bit base. It stores the l-bit values in `dtype`, so it
                       reproduces PLR at l, not its memory saving.

Both folders are written atomically (restora.core.atomic).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from restora.adapters import adapter_modules, read_adapter_config, save_adapter
from restora.adapters.files import CONFIG_NAME, read_provenance
from restora.core.atomic import atomic_dir
from restora.models.load import resolve_source
from restora.models.loaded import LoadedModel
from restora.models.save import save_hf
from restora.quant.model import quantizable_layers
from restora.restore.adapter import RestoreOptions
from restora.restore.plr import (
    RestoreInfo,
    dequantize_model,
    merge_and_unload,
    restore_base,
    train_spec,
)

__all__ = [
    "EXPORT_RECORD",
    "PEFT_LORA_FIELDS",
    "VLLM_MAX_LORA_RANKS",
    "carried_provenance",
    "check_servable",
    "declare_biases",
    "default_merge",
    "export_merged_hf",
    "export_peft",
    "served_source",
    "write_hf_folder",
]

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's --max-lora-rank choices
# The adapter_config.json fields an exported folder may hold: all are peft.LoraConfig fields.
PEFT_LORA_FIELDS = frozenset({
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "r", "lora_alpha",
    "lora_dropout", "use_rslora", "init_lora_weights", "target_modules", "fan_in_fan_out", "bias", "use_dora",
    "lora_bias", "modules_to_save", "rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern",
})
EXPORT_RECORD = "restora_export.json"  # provenance beside a merged folder (transformers ignores it)


def carried_provenance(info: RestoreInfo, loaded: LoadedModel) -> dict[str, Any]:
    """The provenance a re-saved adapter keeps: its base, hash, training and metrics, and the
    quantization it was trained on; base and hash default to the model it was just loaded on."""
    prov = dict(info.provenance or {})
    keep = {k: prov[k] for k in ("base_model", "source_hash", "training", "metrics") if k in prov}
    keep.setdefault("base_model", loaded.source)
    keep.setdefault("source_hash", loaded.source_hash)
    keep["quantization"] = info.train_spec.to_dict() if info.train_spec else None
    return keep


def served_source(spec: str) -> str:
    """What a server loads for model `spec`: an absolute folder (aliases: the converted cache), or the hub id."""
    where = resolve_source(spec)
    return str(where.resolve()) if isinstance(where, Path) else where


def check_servable(config: dict[str, Any], where: str | Path) -> None:
    """Refuse, in one line naming the value, an adapter_config.json that vLLM cannot serve."""
    path = Path(where) / CONFIG_NAME
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type={config.get('peft_type')!r}: vLLM and SGLang serve only LoRA "
                         f"(use --to merged-hf)")
    refused = {"bias": config.get("bias", "none") != "none", "use_dora": bool(config.get("use_dora")),
               "lora_bias": bool(config.get("lora_bias")), "modules_to_save": bool(config.get("modules_to_save"))}
    for key in (k for k, bad in refused.items() if bad):
        raise ValueError(f"{path}: {key}={config[key]!r}: vLLM serves plain LoRA only (no biases, DoRA or saved modules)")
    extra = sorted(set(config) - PEFT_LORA_FIELDS)
    if extra:
        raise ValueError(f"{path}: fields {extra} are not PEFT LoraConfig fields")
    r = int(config["r"])
    if r > VLLM_MAX_LORA_RANKS[-1]:
        raise ValueError(f"{path}: r={r}: vLLM serves LoRA ranks up to {VLLM_MAX_LORA_RANKS[-1]}")
    targets = config.get("target_modules")
    if not isinstance(targets, list) or not targets or any("." in t for t in targets):
        raise ValueError(f"{path}: target_modules={targets!r}: expected a list of leaf module names")


def export_peft(adapter_dir: str | Path, out: str | Path, model: str | None = None, force: bool = False) -> Path:
    """The adapter as a clean PEFT LoRA folder on its 16-bit source model (PLR16); returns `out`.

    The adapter is first loaded onto the source model (checking keys, shapes and the source
    hash as `restora restore` does), then saved from there, so PEFT-made folders come out
    normalised too. When the leaf target names also match layers the adapter does not cover
    (e.g. only block 0 adapted), PEFT gives those layers B = 0 (no change) and vLLM/SGLang
    apply only the layers present in the tensor file, so every loader computes the same model.
    """
    kind, _ = read_adapter_config(adapter_dir)
    if kind != "lora":
        raise ValueError(f"{Path(adapter_dir) / CONFIG_NAME}: an (IA)³ adapter: vLLM and SGLang serve only LoRA "
                         f"(use --to merged-hf; peft itself loads the folder as it is)")
    loaded, info = restore_base(adapter_dir, 16, model=model, force=force)
    keep = carried_provenance(info, loaded)
    source = served_source(model or keep["base_model"])
    notes = {"export": {"to": "peft", "from": str(Path(adapter_dir).resolve()), "served_base": source}}
    if (info.provenance or {}).get("notes") is not None:
        notes["original"] = info.provenance["notes"]  # type: ignore[index]
    paths = [p for p, _ in adapter_modules(loaded.model)]
    with atomic_dir(out) as tmp:
        save_adapter(loaded.model, tmp, {**keep, "notes": notes})
        config = json.loads((tmp / CONFIG_NAME).read_text())
        config["base_model_name_or_path"] = source
        config["target_modules"] = sorted({p.rsplit(".", 1)[-1] for p in paths})  # leaf names, as vLLM/SGLang match
        check_servable(config, out)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        read_adapter_config(tmp)  # restora still reads what it wrote
    return Path(out)


@torch.no_grad()
def declare_biases(model: nn.Module) -> None:
    """Bias correction adds biases a bias-free architecture (Llama) does not declare: declare them
    in the config and give every other projection a zero bias, so plain transformers loads it."""
    names = quantizable_layers(model)
    if not any(model.get_submodule(n).bias is not None for n in names):
        return
    cfg = model.config
    if not (hasattr(cfg, "attention_bias") and hasattr(cfg, "mlp_bias")):
        raise ValueError(f"{type(model).__name__}: its config cannot declare the bias-corrected layers' biases: "
                         f"no plain transformers folder (keep the adapter unmerged)")
    cfg.attention_bias = cfg.mlp_bias = True
    for n in names:
        lin = model.get_submodule(n)
        if lin.bias is None:
            lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype), requires_grad=False)


def _check_plain(model: nn.Module) -> None:
    """The merged model must have exactly the parameters its config builds (no restora modules left)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        ref = AutoModelForCausalLM.from_config(model.config)
    have, want = set(model.state_dict()), set(ref.state_dict())
    if have != want:
        odd = sorted(have ^ want)
        raise RuntimeError(f"merged model does not match its config: {odd[0]} ({len(odd)} keys differ)")


def write_hf_folder(model: nn.Module, tokenizer: Any, out: str | Path, dtype: torch.dtype | None = None,
                    record: dict[str, Any] | None = None) -> Path:
    """A merged float model as a plain transformers folder (config, safetensors, tokenizer,
    generation config), written atomically; `record` goes to restora_export.json."""
    declare_biases(model)
    _check_plain(model)
    if dtype is not None:
        model.to(dtype)
    with atomic_dir(out) as tmp:
        save_hf(model, tmp, tokenizer)
        if record is not None:
            (tmp / EXPORT_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    return Path(out)


# What `export --to merged-hf` merges into when neither --bits nor a restoration is given: the choice the PLR
# study (docs/plr-study.md) supports for a QLoRA adapter, and the reason printed with it.
DEFAULT_MERGE_MODE = "auto"
DEFAULT_MERGE_REASON = ("the PLR study (docs/plr-study.md) found that restoring the base to 16 bits helps some QLoRA "
                        "adapters and hurts others; auto keeps the k-bit base (the adapter merged into its "
                        "dequantized base) unless a restoration scores better on the validation split")


def default_merge(adapter_dir: str | Path, bits: int | None, options: RestoreOptions) -> tuple[int, RestoreOptions, str]:
    """The restore bits and options `export --to merged-hf` uses, and why: the user's choice when --bits or a
    restoration is given, the 16-bit base an adapter trained on one, else the study's default."""
    if bits is not None or options.restore_mode != "plain" or options.base != "source":
        return bits if bits is not None else 16, options, "as asked"
    train = train_spec(read_provenance(adapter_dir))
    if train is None or train.is_float:
        return 16, options, "the adapter was trained on the 16-bit base"
    return 16, replace(options, restore_mode=DEFAULT_MERGE_MODE), DEFAULT_MERGE_REASON


def export_merged_hf(loaded: LoadedModel, out: str | Path, dtype: torch.dtype = torch.bfloat16,
                     record: dict[str, Any] | None = None) -> Path:
    """Fold the adapter of a restored model into dense weights and write a plain transformers folder.

    An l-bit base is dequantized to fp32 first and the adapter added there, so the folder holds
    deq(W^(l)) + s·BA (+ any bias correction), rounded once to `dtype`.
    """
    m = loaded.model
    dequantize_model(m, torch.float32)
    merge_and_unload(m)
    return write_hf_folder(m, loaded.tokenizer, out, dtype, record)
