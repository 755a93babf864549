"""A decoder's shape, read from its transformers config, and the bytes restora's formats store a weight in.

Everything the memory planner (restora.plan.memory) counts starts from these: `ModelShape` holds the sizes that
decide memory, and `linear_bytes` follows restora's formats exactly (quant/nf4.py, int8.py, uniform.py; tests
check it against `QuantizedWeight.nbytes()`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["DTYPE_BYTES", "ModelShape", "linear_bytes"]

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class ModelShape:
    """The sizes that decide memory, read from a transformers config."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    gated_mlp: bool = True  # Llama/Qwen2/Mistral/Gemma: gate, up, down; GPT-2: fc, proj
    positions: int = 0  # learned position embeddings (GPT-2), else 0

    def __post_init__(self) -> None:
        for name in ("hidden", "intermediate", "layers", "heads", "kv_heads", "head_dim", "vocab"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model config: {name} must be positive, got {getattr(self, name)}")

    @classmethod
    def from_config(cls, config: Any) -> "ModelShape":
        """From a transformers PretrainedConfig (Llama-family names, or GPT-2's n_embd/n_layer/n_head)."""
        get = lambda *names, default=None: next(  # noqa: E731
            (getattr(config, n) for n in names if getattr(config, n, None) is not None), default
        )
        hidden = get("hidden_size", "n_embd")
        heads = get("num_attention_heads", "n_head")
        if hidden is None or heads is None or get("num_hidden_layers", "n_layer") is None:
            raise ValueError(f"model config {type(config).__name__}: cannot find hidden size, heads and layers")
        gpt2 = getattr(config, "model_type", "") == "gpt2"
        return cls(
            hidden=hidden,
            intermediate=get("intermediate_size", "n_inner", default=None) or 4 * hidden,
            layers=get("num_hidden_layers", "n_layer"),
            heads=heads,
            kv_heads=get("num_key_value_heads", default=heads),
            head_dim=get("head_dim", default=None) or hidden // heads,
            vocab=get("vocab_size"),
            tied=bool(get("tie_word_embeddings", default=True)),
            gated_mlp=not gpt2,
            positions=get("n_positions", default=0) if gpt2 else 0,
        )

    def linears(self) -> list[tuple[str, int, int]]:
        """(name, out_features, in_features) of one block's linear layers."""
        H, I, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        attn = [("q_proj", q, H), ("k_proj", kv, H), ("v_proj", kv, H), ("o_proj", H, q)]
        mlp = [("gate_proj", I, H), ("up_proj", I, H), ("down_proj", H, I)] if self.gated_mlp else [
            ("up_proj", I, H), ("down_proj", H, I)]
        return attn + mlp

    def targets(self, targets: str) -> list[tuple[str, int, int]]:
        """The linear layers of one block an adapter preset wraps (restora.adapters.inject.PRESETS)."""
        every = self.linears()
        if targets == "all":
            return every
        if targets == "attn":
            return every[:4]
        if targets == "ia3":
            return [t for t in every if t[0] in ("k_proj", "v_proj", "down_proj")]
        raise ValueError(f"targets must be all, attn or ia3 for planning, got {targets!r}")

    def linear_params(self) -> int:
        return self.layers * sum(o * i for _, o, i in self.linears())


def linear_bytes(out_f: int, in_f: int, format: str, bits: int, group_size: int = 64, double_quant: bool = False,
                 act_order: bool = False, float_bytes: int = 4) -> int:
    """Bytes of one (out, in) weight stored by restora's format (QuantizedWeight.nbytes())."""
    n = out_f * in_f
    if format == "float":
        return n * float_bytes
    if format in ("nf4", "fp4"):  # NF4Weight: packed codes + fp32 absmax (or 8-bit absmax + fp32 scales + offset)
        blocks = n // group_size
        scales = blocks + 4 * -(-blocks // 256) + 4 if double_quant else 4 * blocks
        return n // 2 + scales
    groups = 1 if group_size == -1 else in_f // group_size
    if format == "int8":  # Int8Weight: int8 codes + fp32 scale per group
        return n + 4 * out_f * groups
    if format in ("rtn", "gptq"):  # UniformWeight: packed codes + fp16 scale + uint8 zero per group
        return out_f * (in_f * bits // 8) + 3 * out_f * groups + (4 * in_f if act_order else 0)
    raise ValueError(f"unknown format {format!r}: expected float, nf4, fp4, int8, rtn or gptq")
