"""(IA)³ and the T-Few losses (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is
Better and Cheaper than In-Context Learning", arXiv:2205.05638).

(IA)³ ("Infused Adapter by Inhibiting and Amplifying Inner Activations") learns three vectors
per block, initialised to ones, that rescale

    keys            k = l_k ⊙ (W_k x)
    values          v = l_v ⊙ (W_v x)
    FFN activation  y = W_down (l_ff ⊙ a),   a = the FFN inner activation (input of down_proj)

`IA3Linear` follows PEFT's semantics so that files interoperate: on a "feedforward" module
the vector scales the layer's input (shape (in,)), on any other module its output (shape
(out,)). Like LoRA it wraps any base layer and never looks inside it; merge / unmerge fold the
vector into the weight only when asked, through `replace_weight` (a quantized base builds its
successor with `with_weight`: its format requantizes the scaled weight).

T-Few trains on multiple-choice data with, besides the usual LM loss, an unlikelihood loss
pushing down the probability of the wrong choices' tokens and a softmax loss over the
length-normalised log-probabilities of the choices, which is also how a choice is predicted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from restora.quant.linear import linear_shape, weight_of

from restora.adapters.lora import replace_weight, swap_base_of

__all__ = [
    "IA3Config", "IA3Linear", "token_log_probs", "choice_scores", "length_normalized_choice_loss",
    "unlikelihood_loss",
]


@dataclass
class IA3Config:
    """(IA)³ settings.

    target_modules: "ia3" (keys, values and the FFN down projection: k_proj, v_proj, down_proj;
        GPT-2 c_attn and mlp.c_proj, as PEFT), or names / a regex as in LoRAConfig.
    feedforward_modules: which targets get an input-side vector (the FFN inner activation):
        None picks the down projections among the targets, else names / a regex.
    """

    target_modules: str | list[str] = "ia3"
    feedforward_modules: str | list[str] | None = None

    def __post_init__(self) -> None:
        for field, value in (("target_modules", self.target_modules), ("feedforward_modules", self.feedforward_modules)):
            if value is None and field == "feedforward_modules":
                continue
            if isinstance(value, (list, tuple)):
                if (not value and field == "target_modules") or not all(isinstance(t, str) and t for t in value):
                    raise ValueError(f"IA3 {field} must be non-empty names, got {value!r}")
            elif not isinstance(value, str) or not value:
                raise ValueError(f"IA3 {field} must be a preset, a regex or a list of names, got {value!r}")
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if isinstance(self.feedforward_modules, tuple):
            self.feedforward_modules = list(self.feedforward_modules)


class IA3Linear(nn.Module):
    """base_layer(l ⊙ x) on feedforward modules, l ⊙ base_layer(x) otherwise; l starts at ones."""

    def __init__(self, base_layer: nn.Module, is_feedforward: bool) -> None:
        super().__init__()
        out_features, in_features = linear_shape(base_layer)
        self.base_layer = base_layer
        self.is_feedforward = is_feedforward
        self.in_features, self.out_features = in_features, out_features
        w = next(iter([*base_layer.parameters(), *base_layer.buffers()]), None)  # a quantized base has buffers only
        size = in_features if is_feedforward else out_features
        self.ia3_l = nn.Parameter(torch.ones(size, device=w.device if w is not None else None))
        self.adapter_enabled = True
        self.merged = False
        self._unmerged: list[nn.Module] = []  # the base merging replaced, kept exact (not a submodule)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.adapter_enabled or self.merged:
            return self.base_layer(x)
        if self.is_feedforward:
            return self.base_layer((x * self.ia3_l).to(x.dtype))  # (..., in) ⊙ (in,)
        y = self.base_layer(x)
        return (y * self.ia3_l).to(y.dtype)  # (..., out) ⊙ (out,)

    # -- the adapter interface ------------------------------------------------------------
    def adapter_params(self) -> list[nn.Parameter]:
        return [self.ia3_l]

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """PEFT stores (1, in) for feedforward modules and (out, 1) otherwise."""
        v = self.ia3_l.detach()
        return {"ia3_l": v.view(1, -1) if self.is_feedforward else v.view(-1, 1)}

    @torch.no_grad()
    def load_peft_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.ia3_l.copy_(tensors["ia3_l"].reshape(-1))

    def _scaled(self, inverse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The base's (out, in) weight and bias with the vector folded in (or out)."""
        l = self.ia3_l.detach().float()
        if inverse:
            if bool((l == 0).any()):
                raise ValueError("cannot unmerge an (IA)³ vector containing zeros")
            l = 1.0 / l
        w = weight_of(self.base_layer)
        bias = getattr(self.base_layer, "bias", None)
        if self.is_feedforward:
            return w * l[None, :], None  # scale input columns; the bias is untouched
        new_bias = None if bias is None else bias.detach().float() * l
        return l[:, None] * w, new_bias  # scale output rows and the bias

    @torch.no_grad()
    def merge(self) -> None:
        """Fold l into the weight. Merging twice equals merging once."""
        if self.merged:
            return
        w, b = self._scaled(inverse=False)
        new_base = replace_weight(self.base_layer, w, b)
        if new_base is not self.base_layer:
            self._unmerged, self.base_layer = [self.base_layer], new_base
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge`: a quantized base comes back exactly; a float base by division."""
        if not self.merged:
            return
        if self._unmerged:
            self.base_layer = self._unmerged.pop()
        else:
            w, b = self._scaled(inverse=True)
            replace_weight(self.base_layer, w, b)
        self.merged = False

    def swap_base(self, new_base: nn.Module) -> nn.Module:
        """Put `new_base` under this adapter (PLR's restore step); returns the old base."""
        return swap_base_of(self, new_base, "(IA)³ layer")

    def extra_repr(self) -> str:
        return f"feedforward={self.is_feedforward}, merged={self.merged}"


# -- T-Few losses -----------------------------------------------------------------------------
# Shapes: C answer choices per example, each a sequence of T tokens (prompt + choice, padded).
#   logits  (..., C, T, V)   logits[..., t, :] predicts targets[..., t]   (already shifted)
#   targets (..., C, T)      token ids
#   mask    (..., C, T)      1 on the answer-choice tokens, 0 on prompt and padding
#   correct (...,)           index of the right choice


def token_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets[t] | ...) for every position: (..., C, T)."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (..., C, T, V)
    return logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)  # (..., C, T)


def choice_scores(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """T-Few's length-normalised log-probability of each choice, β(x, y) = (1/T(y)) Σ_t log p(y_t | x, y_<t).

    Returns (..., C); the predicted choice is its argmax (T-Few §3.2, rank classification).
    """
    m = mask.to(torch.float32)
    lengths = m.sum(-1)
    if bool((lengths == 0).any()):
        raise ValueError("choice mask has a choice with no tokens")
    return (token_log_probs(logits, targets) * m).sum(-1) / lengths  # (..., C)


def length_normalized_choice_loss(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, correct: torch.Tensor
) -> torch.Tensor:
    """T-Few's L_LN = -log( exp β(x, y*) / Σ_n exp β(x, y_n) ): softmax cross-entropy over the
    length-normalised choice scores, averaged over examples."""
    scores = choice_scores(logits, targets, mask)  # (..., C)
    return F.cross_entropy(scores.reshape(-1, scores.shape[-1]), correct.reshape(-1).long())


def unlikelihood_loss(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, correct: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """T-Few's L_UL = -Σ_{n wrong} Σ_t log(1 - p(ŷ_t^(n) | x, ŷ_<t^(n))) / Σ_{n wrong} T(ŷ^(n)):
    the mean, over the tokens of the wrong choices, of -log(1 - p). The right choice is excluded;
    p is clamped to 1 - eps so the loss stays finite."""
    num_choices = mask.shape[-2]
    wrong = 1.0 - F.one_hot(correct.long(), num_choices).to(torch.float32)  # (..., C)
    weight = mask.to(torch.float32) * wrong.unsqueeze(-1)  # (..., C, T)
    total = weight.sum()
    if total == 0:
        raise ValueError("unlikelihood_loss needs at least one token of a wrong choice")
    p = token_log_probs(logits, targets).exp().clamp(max=1.0 - eps)  # (..., C, T)
    return -(torch.log1p(-p) * weight).sum() / total
