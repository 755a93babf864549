"""Adapters over any base format: LoRA, (IA)³ (+ T-Few losses), target injection, PEFT-compatible folders."""

from restora.adapters.batched import BASE, MultiLoRALinear, set_rows
from restora.adapters.files import AdapterInfo, load_adapter, read_adapter_config, save_adapter
from restora.adapters.ia3 import (
    IA3Config, IA3Linear, choice_scores, length_normalized_choice_loss, token_log_probs, unlikelihood_loss,
)
from restora.adapters.inject import (
    add_ia3, add_lora, adapter_state_dict, linear_layers, load_adapter_state_dict, mark_only_adapters_trainable,
    remove_adapters, select_targets, target_names,
)
from restora.adapters.lora import AdapterModule, LoRAConfig, LoRALinear, adapter_modules, disable_adapters, replace_weight
from restora.adapters.multi import MultiAdapterModel, load_adapters

__all__ = [
    "LoRAConfig", "LoRALinear", "IA3Config", "IA3Linear", "AdapterModule", "AdapterInfo",
    "add_lora", "add_ia3", "remove_adapters", "select_targets", "target_names", "linear_layers",
    "mark_only_adapters_trainable", "adapter_modules", "disable_adapters", "replace_weight",
    "adapter_state_dict", "load_adapter_state_dict", "save_adapter", "load_adapter", "read_adapter_config",
    "BASE", "MultiLoRALinear", "MultiAdapterModel", "load_adapters", "set_rows",
    "token_log_probs", "choice_scores", "length_normalized_choice_loss", "unlikelihood_loss",
]
