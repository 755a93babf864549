"""Which layers get an adapter, wrapping them in place, and the adapter's state dict.

Targets follow PEFT's rules so that adapter folders mean the same thing in both tools:
a list of names matches every module whose path equals a name or ends with "." + name; a
string is a regex that must match a whole path. restora adds presets:

    "all"   every linear layer of the decoder blocks, MLP included (LoRA Without Regret's
            advice, and the default; PEFT's "all-linear" means the same here)
    "attn"  the attention projections q, k, v, o (GPT-2: attn.c_attn, attn.c_proj), the PLR protocol
    "ia3"   keys, values and the FFN down projection (GPT-2: attn.c_attn and mlp.c_proj), as
            PEFT's (IA)³ defaults, with the down projection as the feedforward module

These cover the Llama, Qwen2, Mistral, Gemma and GPT-2 families of transformers models.
Wrapping replaces the module at its path, so the path of every adapter parameter is PEFT's:
`base_model.model.<path>.lora_A.weight`, `... .lora_B.weight`, `... .ia3_l`.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from restora.quant.linear import is_linear
from restora.core.modules import decoder_blocks, set_module

from restora.adapters.ia3 import IA3Config, IA3Linear
from restora.adapters.lora import AdapterModule, LoRAConfig, LoRALinear, adapter_modules

__all__ = [
    "checked_peft_state",
    "PEFT_PREFIX", "PRESETS", "linear_layers", "select_targets", "target_names", "add_lora", "add_ia3", "feedforward_paths",
    "remove_adapters", "mark_only_adapters_trainable", "adapter_state_dict", "load_adapter_state_dict",
]

PEFT_PREFIX = "base_model.model."

_ATTN = r".*\.(q_proj|k_proj|v_proj|o_proj|attn\.c_attn|attn\.c_proj)"
_IA3 = r".*\.(k_proj|v_proj|down_proj|attn\.c_attn|mlp\.c_proj)"
_FEEDFORWARD = r".*\.(down_proj|mlp\.c_proj)"
PRESETS: dict[str, str | None] = {"all": None, "all-linear": None, "attn": _ATTN, "ia3": _IA3}


def linear_layers(model: nn.Module, blocks_only: bool = False) -> list[str]:
    """Paths of the linear layers, adapted or not (an adapter counts as its layer; its insides do not)."""
    prefix = ""
    if blocks_only:
        blocks = decoder_blocks(model)
        prefix = next(n for n, m in model.named_modules() if m is blocks) + "."
    inside: list[str] = [n + "." for n, _ in adapter_modules(model)]
    return [
        name
        for name, module in model.named_modules()
        if (is_linear(module) or isinstance(module, AdapterModule))
        and name.startswith(prefix)
        and not any(name.startswith(p) for p in inside)
    ]


def _available(names: list[str]) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    more = ", ..." if len(leaves) > 8 else ""
    return ", ".join(leaves[:8]) + more


def select_targets(model: nn.Module, targets: str | list[str]) -> list[str]:
    """Paths of the layers `targets` names (a preset, a regex, or a list of names); one-line errors."""
    kind = type(model).__name__
    if isinstance(targets, str) and targets in PRESETS:
        pool = linear_layers(model, blocks_only=True)
        pattern = PRESETS[targets]
        chosen = pool if pattern is None else [n for n in pool if re.fullmatch(pattern, n)]
        if not chosen:
            raise ValueError(f"preset {targets!r} matches no layer of {kind} (available: {_available(pool)})")
        return chosen
    pool = linear_layers(model)
    if isinstance(targets, str):
        chosen = [n for n in pool if re.fullmatch(targets, n)]
        if not chosen:
            raise ValueError(f"target regex {targets!r} matches no linear layer of {kind} (available: {_available(pool)})")
        return chosen
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in pool):
            raise ValueError(f"target {t!r} matches no linear layer of {kind} (available: {_available(pool)})")
    return [n for n in pool if any(n == t or n.endswith("." + t) for t in targets)]


def target_names(model: nn.Module, paths: list[str]) -> list[str]:
    """Shortest PEFT-style names (path suffixes) selecting exactly `paths`, e.g. ["q_proj", "mlp.c_proj"]."""
    pool = [n for n in linear_layers(model) if n not in paths] + list(paths)
    chosen = set(paths)
    names: set[str] = set()
    for path in paths:
        parts = path.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if all(n in chosen for n in pool if n == suffix or n.endswith("." + suffix)):
                names.add(suffix)
                break
    return sorted(names)


def _wrap(model: nn.Module, paths: list[str], make: Callable[[str, nn.Module], nn.Module]) -> list[str]:
    for path in paths:
        module = model.get_submodule(path)
        if isinstance(module, AdapterModule):
            raise ValueError(f"layer {path} already has an adapter")
    for path in paths:
        set_module(model, path, make(path, model.get_submodule(path)))
    mark_only_adapters_trainable(model)
    return paths


def add_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Wrap the target layers of `model` in LoRALinear, in place; freeze everything else.

    Returns the wrapped paths. Each layer gets its own A (drawn from torch's current RNG) and B = 0.
    """
    return _wrap(model, select_targets(model, config.target_modules), lambda _, m: LoRALinear(m, config))


def feedforward_paths(paths: list[str], ff: str | list[str] | None) -> set[str]:
    """Which (IA)³ targets scale their input: `ff` names or a regex, by default the MLP down projections."""
    if ff is None:
        return {p for p in paths if re.fullmatch(_FEEDFORWARD, p)}
    if isinstance(ff, str):
        return {p for p in paths if re.fullmatch(ff, p)}
    return {p for p in paths if any(p == t or p.endswith("." + t) for t in ff)}


def add_ia3(model: nn.Module, config: IA3Config | None = None) -> list[str]:
    """Wrap the target layers of `model` in IA3Linear (vectors at ones), in place; freeze everything else."""
    config = config or IA3Config()
    paths = select_targets(model, config.target_modules)
    feedforward = feedforward_paths(paths, config.feedforward_modules)
    return _wrap(model, paths, lambda p, m: IA3Linear(m, is_feedforward=p in feedforward))


def remove_adapters(model: nn.Module) -> list[str]:
    """Unwrap every (unmerged) adapter, putting its base layer back at its path; returns the paths."""
    found = list(adapter_modules(model))
    merged = [p for p, m in found if m.merged]
    if merged:
        raise ValueError(f"cannot remove merged adapter {merged[0]}: call unmerge() first")
    for path, module in found:
        set_module(model, path, module.base_layer)
    return [p for p, _ in found]


def mark_only_adapters_trainable(model: nn.Module) -> int:
    """requires_grad only on adapter parameters; returns how many parameters train."""
    for p in model.parameters():
        p.requires_grad_(False)
    n = 0
    for _, module in adapter_modules(model):
        for p in module.adapter_params():
            p.requires_grad_(True)
            n += p.numel()
    return n


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor under PEFT's key: base_model.model.<path>.lora_A.weight etc."""
    out: dict[str, torch.Tensor] = {}
    for path, module in adapter_modules(model):
        for key, tensor in module.peft_tensors().items():
            out[f"{PEFT_PREFIX}{path}.{key}"] = tensor.detach().contiguous()
    return out


def checked_peft_state(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]],
                       source: str) -> dict[str, torch.Tensor]:
    """`state` with PEFT's adapter name (".default") dropped from its keys, once it holds exactly the `expected`
    keys, each of its expected shape and with finite values; one-line errors naming `source`."""
    state = {k.replace(".default.", ".").removesuffix(".default"): v for k, v in state.items()}
    missing = [k for k in expected if k not in state]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ValueError(f"{source}: missing adapter tensor {missing[0]}{more}")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        raise ValueError(f"{source}: tensor {unexpected[0]}{more} does not belong to any adapter of the model")
    for k, shape in expected.items():
        if tuple(state[k].shape) != tuple(shape):
            raise ValueError(f"{source}: shape mismatch for {k}: file has {tuple(state[k].shape)}, model needs "
                             f"{tuple(shape)}")
        if state[k].is_floating_point() and not bool(torch.isfinite(state[k]).all()):
            raise ValueError(f"{source}: tensor {k} holds NaN or infinite values")
    return state


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Copy PEFT-keyed tensors into the model's adapters; one-line errors naming `source`.

    Every adapter tensor must be present with its exact shape and finite values, and every key must belong to
    an adapter (keys with PEFT's ".default" adapter name are accepted too).
    """
    expected: dict[str, tuple[AdapterModule, str, torch.Tensor]] = {}
    for path, module in adapter_modules(model):
        for key, tensor in module.peft_tensors().items():
            expected[f"{PEFT_PREFIX}{path}.{key}"] = (module, key, tensor)
    state = checked_peft_state(state, {k: tuple(t.shape) for k, (_, _, t) in expected.items()}, source)
    by_module: dict[int, tuple[AdapterModule, dict[str, torch.Tensor]]] = {}
    for k, (module, key, _) in expected.items():
        by_module.setdefault(id(module), (module, {}))[1][key] = state[k]
    for module, tensors in by_module.values():
        module.load_peft_tensors(tensors)
