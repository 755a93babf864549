"""QuantSpec: which format, how many bits, which groups. Checked once, here.

`float` at 16 bits means "no quantization" (the model's own float weights); it is the
top of the restore ladder in Post LoRA Restoration.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["QuantSpec", "SUPPORTED_BITS", "FORMATS"]

SUPPORTED_BITS: dict[str, tuple[int, ...]] = {
    "float": (16,),
    "nf4": (4,),
    "fp4": (4,),
    "int8": (8,),
    "rtn": (2, 3, 4, 8),
    "gptq": (2, 3, 4, 8),
}
FORMATS = tuple(SUPPORTED_BITS)


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize the linear layers of a model.

    format: one of float, nf4, fp4, int8, rtn, gptq.
    bits: code width; must be supported by the format (see SUPPORTED_BITS).
    group_size: inputs sharing one scale (nf4/fp4: the absmax block size; int8: block
        size, -1 per row; rtn/gptq: group size, -1 per output channel).
    double_quant: nf4/fp4 only, quantize the absmax constants to 8 bits (QLoRA).
    act_order: gptq only, quantize columns in order of decreasing Hessian diagonal.
    damp: gptq only, dampening as a fraction of the mean Hessian diagonal.
    block_size: gptq only, columns per lazy batch update.
    """

    format: str = "nf4"
    bits: int = 4
    group_size: int = 64
    double_quant: bool = False
    act_order: bool = False
    damp: float = 0.01
    block_size: int = 128

    def __post_init__(self) -> None:
        if self.format not in SUPPORTED_BITS:
            raise ValueError(f"unknown format {self.format!r}: expected one of {', '.join(FORMATS)}")
        ok = SUPPORTED_BITS[self.format]
        if self.bits not in ok:
            raise ValueError(
                f"format {self.format!r} does not support {self.bits} bits: expected {' or '.join(map(str, ok))}"
            )
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"group_size must be positive or -1, got {self.group_size}")
        if self.format in ("nf4", "fp4") and self.group_size == -1:
            raise ValueError("nf4/fp4 need a positive block size (group_size), got -1")
        if self.group_size != -1 and self.group_size % 8 and self.format in ("rtn", "gptq"):
            raise ValueError(f"group_size must be a multiple of 8 for bit packing, got {self.group_size}")
        if self.double_quant and self.format not in ("nf4", "fp4"):
            raise ValueError(f"double_quant applies to nf4/fp4 only, not {self.format!r}")
        if self.act_order and self.format != "gptq":
            raise ValueError(f"act_order applies to gptq only, not {self.format!r}")
        if not 0 <= self.damp < 1:
            raise ValueError(f"damp must be in [0, 1), got {self.damp}")
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")

    @property
    def is_float(self) -> bool:
        return self.format == "float"

    def check_layer(self, name: str, in_features: int) -> None:
        """Raise a one-line error if this spec cannot quantize a layer with `in_features` inputs."""
        if self.is_float:
            return
        if in_features % 8:
            raise ValueError(f"layer {name}: in_features {in_features} is not a multiple of 8")
        g = self.group_size
        if g != -1 and in_features % g:
            raise ValueError(
                f"layer {name}: group size {g} does not divide in_features {in_features}"
                f" (choose a divisor, e.g. 64, or -1 for per-channel)"
            )

    def label(self) -> str:
        """Short name for tables and folders, e.g. gptq-4b-g64."""
        if self.is_float:
            return "float16"
        s = f"{self.format}-{self.bits}b-g{self.group_size}"
        if self.double_quant:
            s += "-dq"
        if self.act_order:
            s += "-act"
        return s

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantSpec":
        known = set(cls.__dataclass_fields__)
        extra = set(d) - known
        if extra:
            raise ValueError(f"unknown quantization fields {sorted(extra)}: expected {sorted(known)}")
        return cls(**d)
