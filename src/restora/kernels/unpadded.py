"""Padding-free training forward: the linear layers see only real tokens.

A micro-batch of B rows is right padded to its longest row, T tokens. Every projection
and MLP of a decoder (nearly all of a step's work) costs the same for a padding token as
for a real one, and SFT rows differ a lot in length: the benchmark's batches of 8 SQL
Create Context rows are 44-78% real tokens. So the loss forward runs "unpadded", as
variable-length training does in FlashAttention-2 (Dao 2023, `flash_attn_varlen`) and in
HF TRL's `padding_free`:

    idx = flat indices b*T + t of the N real tokens                       (N,)
    ids, positions -> (1, N) packed rows; RoPE uses each token's own position
    per block:  x (1, N, H) -> q, k, v projections on N tokens only
                q, k, v scattered back to the padded layout               (B, heads, T, D)
                the model family's eager attention, masked causal + key padding
                output gathered back to the N real tokens                 (1, N, heads, D)
                o_proj and the MLP on N tokens only

The packed length is rounded up to a multiple of `BUCKET` with inert filler tokens (no
attention, no label): oneDNN builds a kernel per new matrix shape (a first-seen row count
costs ~3x a cached one on this repo's CPU), and rounding keeps the set of shapes small.

Attention itself runs in the padded layout (it is a small share of the work at SFT
lengths) with exactly the mask the padded forward uses, so every real token's output is
the padded forward's output, up to the rounding of matmuls of another row count.

Only families whose decoder layers pass keyword arguments through to a registered
attention function and read positions from `position_ids`, with full (not sliding-window)
attention, run unpadded: `restora.kernels.attention.can_unpad(model)`. Their attention must be one of restora's
training implementations (restora.kernels.attention registers them); any other model keeps the
padded forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["UNPAD_MODEL_TYPES", "Unpadded", "pad_heads", "unpad", "unpad_heads", "unpaddable_family"]

UNPAD_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
BUCKET = 64  # packed lengths are rounded up to a multiple of this


@dataclass
class Unpadded:
    """A right-padded (B, T) micro-batch as N packed real tokens."""

    ids: torch.Tensor  # (1, N') token ids: the N real tokens, then filler up to a multiple of BUCKET
    positions: torch.Tensor  # (1, N') position of each token within its row (0 for filler)
    rows: torch.Tensor  # (N,) flat index b*T + t of each real token in the padded layout
    mask: torch.Tensor  # (B, 1, T, T) additive attention mask of the padded layout
    targets: torch.Tensor  # (N',) the next token's label at each token, -100 where none


def unpaddable_family(model: nn.Module) -> bool:
    """A supported model family with full attention (whatever attention implementation it runs now)."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in UNPAD_MODEL_TYPES:
        return False
    return not (getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True))


def unpad(ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype, bucket: int = BUCKET) -> Unpadded:
    """Pack the real tokens of right-padded ids/labels/mask (B, T); the attention mask in `dtype`."""
    B, T = ids.shape
    real = mask.bool()
    rows = real.flatten().nonzero().squeeze(1)  # (N,)
    positions = (real.long().cumsum(-1) - 1).flatten()[rows]  # (N,)
    nxt = torch.full_like(labels, -100)
    nxt[:, :-1] = labels[:, 1:]  # the label of token t+1 is predicted at t
    causal = torch.ones((T, T), dtype=torch.bool, device=ids.device).tril()
    visible = causal[None] & real[:, None, :]  # (B, T, T): earlier real keys
    additive = torch.zeros((B, 1, T, T), dtype=dtype, device=ids.device)
    additive.masked_fill_(~visible[:, None], torch.finfo(dtype).min)
    extra = -rows.numel() % bucket  # filler tokens: token 0 at position 0, no label
    packed_ids = torch.cat([ids.flatten()[rows], ids.new_zeros(extra)])
    positions = torch.cat([positions, positions.new_zeros(extra)])
    targets = torch.cat([nxt.flatten()[rows], nxt.new_full((extra,), -100)])
    return Unpadded(packed_ids[None], positions[None], rows, additive, targets)


def pad_heads(x: torch.Tensor, rows: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """(1, heads, N', D) packed -> (B, heads, T, D) padded (zeros at padding; filler dropped)."""
    _, heads, _, D = x.shape
    real = x[0, :, : rows.shape[0]].transpose(0, 1)  # (N, heads, D)
    flat = x.new_zeros((B * T, heads, D)).index_copy(0, rows, real)  # (B*T, heads, D)
    return flat.view(B, T, heads, D).transpose(1, 2)


def unpad_heads(o: torch.Tensor, rows: torch.Tensor, packed: int) -> torch.Tensor:
    """(B, T, heads, D) attention output -> (1, N', heads, D): the real tokens, zeros for filler."""
    B, T, heads, D = o.shape
    real = o.reshape(B * T, heads, D).index_select(0, rows)  # (N, heads, D)
    return torch.cat([real, real.new_zeros((packed - rows.shape[0], heads, D))])[None]
