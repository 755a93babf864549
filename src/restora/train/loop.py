"""Completion-only supervised fine-tuning of adapters on a frozen (possibly quantized) base.

The PLR protocol (the PLR report): rank 16, lr 2e-4, effective batch 32, up to 10 epochs,
keep the epoch with the lowest validation loss. Only parameters with requires_grad
(the adapter's) train; the base stays bit-identical.

Loss. Logits are computed only where a label exists: the decoder's hidden states at
label positions are gathered, (N, H), and projected to the vocabulary in chunks, each
chunk under activation checkpointing, so full-vocabulary logits for the batch never
exist at once and prompt positions never reach the LM head:
    loss = sum_i CE(lm_head(h_i), y_{i+1}) / (label tokens in the effective batch)

Batches. The effective batch is `batch_size` rows, split into micro-batches of
`micro_batch_size` (gradient accumulation). Epoch e visits rows in the permutation
drawn from (seed, e), so a resumed run sees the same order.

Checkpoints. Every `save_every` optimizer steps the adapter, AdamW moments, the RNG
state (dropout) and the trainer position are written to DIR/checkpoint (safetensors + JSON, all or nothing:
restora.core.atomic), so a killed run resumes losing at most the optimizer step in flight. The checkpoint also
records the run's model, base, adapter and data settings (`run`); resuming with any of them changed is refused.

Under torchrun the global batch is split over ranks (restora.train.distributed); with
`parallel="fsdp"` the base and adapter are sharded (restora.train.fsdp) and every file is
written from gathered whole tensors, so checkpoints and adapters look the same either way.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from restora.core.atomic import atomic_dir, recover
from restora.kernels.attention import can_unpad, training_attention
from restora.kernels.compiled import compiled_blocks
from restora.kernels.head_loss import frozen_head, frozen_head_ce
from restora.kernels.unpadded import unpad, unpaddable_family
from restora.train.distributed import (
    DistInfo,
    all_reduce_grads,
    all_reduce_sum,
    barrier,
    init_distributed,
)
from restora.train.fsdp import (
    full_tensor,
    gathered_adapter,
    set_gradient_sync,
    shard_as,
    shard_for_training,
)
from restora.train.optim8bit import AdamW8bit

__all__ = ["Example", "RUN_SETTINGS", "TrainConfig", "check_resume", "completion_loss", "evaluate_loss", "prepare_out",
           "rows_hash", "train"]

Example = dict[str, list[int]]  # {"input_ids": [...], "labels": [...]} with -100 on prompt positions
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, int]]  # (ids, labels, mask) -> (sum, n)
LOGIT_CHUNK = 1024  # label positions projected to the vocabulary at once


@dataclass
class TrainConfig:
    """Training settings (defaults follow the PLR protocol where it has one).

    epochs: passes over the training rows (ignored when max_steps > 0).
    max_steps: stop after this many optimizer steps (0 = run all epochs).
    lr: peak learning rate of AdamW.
    batch_size: effective batch in rows per optimizer step.
    micro_batch_size: rows per forward/backward; must divide batch_size.
    schedule: "constant" or "cosine", both after linear warmup.
    warmup_ratio: fraction of all steps spent warming up.
    weight_decay: AdamW weight decay on adapter parameters.
    optimizer: "adamw" (fp32 moments), "adamw8bit" (blockwise 8-bit moments) or
        "paged_adamw8bit" (bitsandbytes, CUDA only).
    bf16: run the forward/backward under bf16 autocast (fast on CPUs with AMX/AVX512-BF16).
    grad_checkpointing: recompute decoder activations in the backward pass.
    save_every: optimizer steps between resumable checkpoints (0 = never).
    seed: seed of data order and adapter init.
    max_grad_norm: clip the adapter gradient norm (0 = no clipping).
    eager_attention: on CPU, train with eager attention (faster backward than SDPA here).
    compile: compile the decoder blocks with torch.compile while training (restora.kernels.compiled);
        not with FSDP.
    """

    epochs: int = 1
    max_steps: int = 0
    lr: float = 2e-4
    batch_size: int = 32
    micro_batch_size: int = 8
    schedule: str = "constant"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    bf16: bool = True
    grad_checkpointing: bool = False
    save_every: int = 1
    seed: int = 0
    max_grad_norm: float = 1.0
    eager_attention: bool = True
    compile: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.batch_size <= 0 or self.micro_batch_size <= 0:
            raise ValueError(f"batch_size and micro_batch_size must be positive, got {self.batch_size}, {self.micro_batch_size}")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"micro_batch_size {self.micro_batch_size} does not divide batch_size {self.batch_size}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be constant or cosine, got {self.schedule!r}")
        if self.optimizer not in ("adamw", "adamw8bit", "paged_adamw8bit"):
            raise ValueError(f"optimizer must be adamw, adamw8bit or paged_adamw8bit, got {self.optimizer!r}")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ValueError("set epochs > 0 or max_steps > 0")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")

    def resume_key(self) -> dict[str, Any]:
        """Settings that must match for --resume to be meaningful."""
        d = asdict(self)
        for k in ("save_every", "extra", "eager_attention", "compile"):  # speed, not semantics
            d.pop(k)
        return d


def _backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    head = model.get_output_embeddings()
    backbone = getattr(model, model.base_model_prefix, None)
    if head is None or backbone is None:
        raise ValueError(f"{type(model).__name__}: cannot find the decoder and LM head for completion-only loss")
    return backbone, head


def _collate(rows: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):  # right padding
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return ids, labels, mask


def _set_attention(model: nn.Module, impl: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation(impl)
            return
        except (ValueError, ImportError):
            pass
    model.config._attn_implementation = impl


def _chunk_ce(head: nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = head(h).float()  # (n, V): one chunk only
    return F.cross_entropy(logits, y, reduction="sum")


def completion_loss(
    model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """Summed CE over label positions (and their count), logits only at those positions."""
    backbone, head = _backbone_and_head(model)
    if can_unpad(model):  # padding-free: the projections see only real tokens (restora.kernels.unpadded)
        u = unpad(ids, labels, mask, backbone.get_input_embeddings().weight.dtype)
        hidden = backbone(input_ids=u.ids, position_ids=u.positions, use_cache=False, restora_rows=u.rows,
                          restora_mask=u.mask).last_hidden_state[0]  # (N_real, H)
        sel = u.targets != -100
        h, y = hidden[sel], u.targets[sel]  # (N, H), (N,) in the padded forward's (row-major) order
    else:
        hidden = backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state  # (B, T, H)
        target = labels[:, 1:]  # token t+1 is predicted at position t
        sel = target != -100  # (B, T-1)
        h = hidden[:, :-1][sel]  # (N, H)
        y = target[sel]  # (N,)
    extra = -h.shape[0] % 64  # ignored rows: the head's matmuls take fewer distinct (kernel-cached) shapes
    if extra:
        h, y = F.pad(h, (0, 0, 0, extra)), F.pad(y, (0, extra), value=-100)
    if frozen_head(head):  # the usual case: dL/dh computed with the loss, no logits kept or recomputed
        return frozen_head_ce(head, h, y, LOGIT_CHUNK), int(y.numel()) - extra
    total = hidden.new_zeros((), dtype=torch.float32)
    for a in range(0, h.shape[0], LOGIT_CHUNK):
        hc, yc = h[a : a + LOGIT_CHUNK], y[a : a + LOGIT_CHUNK]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_ce, head, hc, yc, use_reentrant=False)
        else:
            total = total + _chunk_ce(head, hc, yc)
    return total, int(y.numel()) - extra


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    rows: Sequence[Example],
    pad_id: int,
    micro_batch_size: int = 8,
    bf16: bool = True,
    dist_info: DistInfo | None = None,
    loss_of: LossFn | None = None,
) -> float:
    """Mean completion log loss (nats/token) over `rows` (split over ranks when distributed).

    `loss_of` replaces `completion_loss(model, ...)` (the FSDP root, under sharding).
    """
    info = dist_info or DistInfo()
    loss_of = loss_of or partial(completion_loss, model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with _attention(model, _scoring_attention(model, device)):
        total, count = _loss_over(rows, pad_id, micro_batch_size, bf16, info, loss_of, device)
    model.train(was_training)
    total, count = all_reduce_sum([total, float(count)], info)
    return total / max(count, 1)


@contextmanager
def _attention(model: nn.Module, impl: str | None) -> Iterator[None]:
    """Run with the model's attention implementation set to `impl` (None: as it is); restored after."""
    before = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl is not None:
        _set_attention(model, impl)
    try:
        yield
    finally:
        if impl is not None and before is not None:
            _set_attention(model, before)


def _scoring_attention(model: nn.Module, device: torch.device) -> str | None:
    """On CPU, score padding-free (restora.kernels.unpadded) as training does, so a later evaluation of an adapter
    repeats its training-time validation loss: the attention that allows it, where the model lacks it."""
    swap = device.type == "cpu" and not can_unpad(model) and unpaddable_family(model)
    return training_attention(model, recompute=False) if swap else None


def _loss_over(rows: Sequence[Example], pad_id: int, micro_batch_size: int, bf16: bool, info: DistInfo,
               loss_of: LossFn, device: torch.device) -> tuple[float, int]:
    total, count = 0.0, 0
    mine = info.shard(range(len(rows)))
    order = sorted(mine, key=lambda i: len(rows[i]["input_ids"]))  # less padding
    batches: list[list[int] | None] = [order[a : a + micro_batch_size] for a in range(0, len(order), micro_batch_size)]
    if info.fsdp:  # every forward gathers parameters: all ranks run as many; a short rank repeats a row, unscored
        most = math.ceil(math.ceil(len(rows) / info.world_size) / micro_batch_size)
        batches += [None] * (most - len(batches))
    for b in batches:
        ids, labels, mask = (t.to(device) for t in _collate([rows[i] for i in b] if b is not None else [rows[0]], pad_id))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            s, n = loss_of(ids, labels, mask)
        if b is not None:
            total += float(s)
            count += n
    return total, count


def _lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    warm = int(cfg.warmup_ratio * total)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "cosine":
        p = (step - warm) / max(1, total - warm)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * p))
    return cfg.lr


def _make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw8bit":
        return AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "paged_adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise RuntimeError("optimizer paged_adamw8bit needs bitsandbytes (and CUDA): pip install bitsandbytes") from e
        return bnb.optim.PagedAdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # the fused (one kernel per step) AdamW: 4.6 against 22 ms per step for SmolLM2's all-linear r16 adapter on CPU;
    # plain tensors only (FSDP's DTensor parameters take the multi-tensor one)
    fused = all(type(p.data) is torch.Tensor and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


def _itself(t: torch.Tensor) -> torch.Tensor:
    return t


def _whole_as_is(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return full


def _checkpoint_tensors(
    named: dict[str, nn.Parameter], opt: torch.optim.Optimizer, whole: Callable[[torch.Tensor], torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Adapter, optimizer moments and RNG state; `whole` gathers sharded tensors (FSDP: on every rank)."""
    tensors = {f"param/{k}": whole(p.detach()).contiguous() for k, p in named.items()}
    index = {id(p): k for k, p in named.items()}
    for group in opt.param_groups:
        for p in group["params"]:
            for sk, sv in opt.state.get(p, {}).items():
                if torch.is_tensor(sv):
                    tensors[f"opt/{index[id(p)]}/{sk}"] = whole(sv.detach()).contiguous()
    tensors["rng/torch"] = torch.get_rng_state()  # dropout masks continue as if never stopped
    return tensors


def _save_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    with atomic_dir(folder) as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "trainer.json").write_text(json.dumps(state, indent=2))


def _read_trainer_state(folder: Path) -> dict[str, Any]:
    path = recover(folder) / "trainer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: nothing to resume")
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    for key in ("step", "config", "history"):
        if not isinstance(state, dict) or key not in state:
            raise ValueError(f"{path}: field {key!r} is missing: expected a trainer state written by restora train")
    return state


def check_resume(folder: str | Path, cfg: TrainConfig, run: dict[str, Any] | None = None) -> dict[str, Any]:
    """The checkpoint's trainer state, if `cfg` and `run` (model, base, adapter and data settings) match what it
    recorded; else a one-line error naming the first setting that differs and both values."""
    folder = Path(folder)
    state = _read_trainer_state(folder)
    mine = json.loads(json.dumps(run or {}, default=str))  # as the checkpoint holds it (lists, not tuples)
    differ = [(k, v, cfg.resume_key().get(k)) for k, v in state["config"].items() if cfg.resume_key().get(k) != v]
    differ += [(k, v, mine[k]) for k, v in (state.get("run") or {}).items() if k in mine and mine[k] != v]
    if differ:
        k, v, now = differ[0]
        raise ValueError(f"cannot resume from {folder}: setting {k} was {v!r}, now {now!r} "
                         "(same settings to resume, or --overwrite to start over)")
    return state


def _load_checkpoint(
    folder: Path,
    named: dict[str, nn.Parameter],
    opt: torch.optim.Optimizer,
    cfg: TrainConfig,
    piece: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = _whole_as_is,
    run: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Restore adapter, moments and RNG; `piece(full, like)` cuts a whole tensor like a sharded one (FSDP)."""
    state = check_resume(folder, cfg, run)
    folder = recover(folder)
    try:
        tensors = load_file(str(folder / "state.safetensors"))
    except (SafetensorError, FileNotFoundError) as e:
        raise ValueError(f"cannot resume from {folder / 'state.safetensors'}: {str(e).splitlines()[0]}") from None
    with torch.no_grad():
        for k, p in named.items():
            key = f"param/{k}"
            if key not in tensors:
                raise ValueError(f"cannot resume from {folder}: adapter tensor {k} is missing")
            if tuple(tensors[key].shape) != tuple(p.shape):
                raise ValueError(f"cannot resume from {folder}: adapter tensor {k} has shape "
                                 f"{tuple(tensors[key].shape)} there, the adapter now has {tuple(p.shape)}")
            p.copy_(piece(tensors[key], p))
    if "rng/torch" in tensors:
        torch.set_rng_state(tensors["rng/torch"])
    for k, p in named.items():
        st = {sk.split("/")[-1]: v for sk, v in tensors.items() if sk.startswith(f"opt/{k}/")}
        if st:
            opt.state[p] = {sk: piece(v, p).clone() for sk, v in st.items()}
    return state


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics lines past the checkpoint's step (written before a kill): a resumed run logs each step once."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except (json.JSONDecodeError, AttributeError):
            pass  # a line cut off by the kill
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in keep))
    tmp.replace(path)


# A run's settings besides TrainConfig that --resume must find unchanged (train_adapter's parameters), with the
# task's name and rows_hash of its rows.
RUN_SETTINGS = ("model", "format", "bits", "group_size", "adapter", "rank", "alpha", "dropout", "rslora", "targets",
                "init", "loftq_iters", "max_len", "max_samples", "val_samples", "chat", "calib_samples")


def rows_hash(rows: Any) -> str:
    """A short sha256 of JSON-able rows (the task's splits): resuming on other data is refused."""
    return hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()[:16]


RUN_FILES = ("adapter_config.json", "adapter_model.safetensors", "restora.json", "loftq_init.safetensors")


def prepare_out(out: str | Path, resume: bool, overwrite: bool, cfg: TrainConfig, run: dict[str, Any] | None,
                clear: bool = True) -> None:
    """Check OUT before any work: a folder holding a run needs --resume (with the same settings) or --overwrite;
    with --overwrite (and `clear`: the writing rank) the old run's files are removed."""
    out = Path(out)
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other: continue the run in OUT, or start over")
    if resume:
        check_resume(out / "checkpoint", cfg, run)
        return
    metrics = out / "metrics.jsonl"
    held = [n for n in ("checkpoint", *RUN_FILES[:3]) if (out / n).exists()]
    held += ["metrics.jsonl"] if metrics.is_file() and metrics.stat().st_size else []
    if not held:
        return
    if not overwrite:
        raise ValueError(f"{out} already holds a training run ({', '.join(held)}): pass --resume to continue it "
                         "or --overwrite to start over")
    if clear:
        for name in ("adapter_config.json", *RUN_FILES[1:], "metrics.jsonl"):  # the config first: readers start there
            (out / name).unlink(missing_ok=True)
        if (out / "checkpoint").exists():
            shutil.rmtree(out / "checkpoint")


def _save_adapter(
    model: nn.Module, info: DistInfo, save_best: Callable[[Path, dict[str, Any]], None], out: Path, metrics: dict
) -> None:
    """Rank 0 writes the adapter folder; under FSDP every rank first gathers the whole adapter."""
    if info.fsdp:
        with gathered_adapter(model):
            if info.is_main:
                save_best(out, metrics)
    elif info.is_main:
        save_best(out, metrics)


def train(
    model: nn.Module,
    train_rows: Sequence[Example],
    val_rows: Sequence[Example],
    cfg: TrainConfig,
    out_dir: str | Path,
    pad_id: int,
    save_best: Callable[[Path, dict[str, Any]], None],
    resume: bool = False,
    progress: bool = True,
    dist_info: DistInfo | None = None,
    run: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train the model's trainable (adapter) parameters; return the metrics summary.

    Under torchrun each rank trains on its share of every global batch and the adapter
    gradients are summed over ranks (see restora.train.distributed); rank 0 alone writes files.
    With `dist_info.parallel == "fsdp"` the model is sharded in place first (restora.train.fsdp).

    `save_best(folder, metrics)` writes the adapter as it is now to `folder` (a PEFT-style
    adapter folder); it is called whenever validation loss improves, at each epoch's end.
    `run` (JSON values: model, base, adapter and data settings) is recorded in the checkpoint and must
    match on resume, as `cfg` must.
    """
    if not train_rows:
        raise ValueError("the training set is empty after filtering")
    info = dist_info or init_distributed()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameters: add an adapter first")
    loss_of: LossFn = partial(completion_loss, model)
    whole, piece = _itself, _whole_as_is  # how files see parameters: as they are, unless sharded
    if info.fsdp:
        if cfg.batch_size % info.world_size:
            raise ValueError(f"--parallel fsdp: batch_size {cfg.batch_size} must be a multiple of the {info.world_size}"
                             " ranks (every rank runs as many forward passes)")
        if cfg.compile:
            raise ValueError("--parallel fsdp: compiled blocks are not supported under sharding; use --compile off")
        if cfg.optimizer != "adamw":
            raise ValueError(f"--parallel fsdp: optimizer {cfg.optimizer!r} cannot step sharded parameters; use adamw")

        loss_of, whole, piece = shard_for_training(model, completion_loss, info), full_tensor, shard_as
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    params = list(named.values())
    opt = _make_optimizer(params, cfg)
    steps_per_epoch = max(1, len(train_rows) // cfg.batch_size)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else steps_per_epoch * cfg.epochs
    epochs = math.ceil(total_steps / steps_per_epoch)
    ckpt = out / "checkpoint"
    step, best, history = 0, float("inf"), []
    if resume:
        state = _load_checkpoint(ckpt, named, opt, cfg, piece, run)
        step, best, history = state["step"], state["best_val_loss"], state["history"]
        if info.is_main:
            _truncate_metrics(out / "metrics.jsonl", step)
    # eager attention on CPU: measured faster than SDPA's CPU backward at SFT lengths; its (T, T) maps recomputed
    # in the backward (restora.kernels.attention), unless whole blocks are recomputed anyway (grad_checkpointing)
    eager = cfg.eager_attention and next(model.parameters()).device.type == "cpu"
    attention = training_attention(model, recompute=not cfg.grad_checkpointing) if eager else None
    if cfg.grad_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    scoped = ExitStack()  # what train() changes on the model for its duration, undone in reverse order
    model.train()
    metrics_log = (out / "metrics.jsonl").open("a") if info.is_main else None
    bar = tqdm(total=total_steps, initial=step, desc="train", disable=not (progress and info.is_main))
    t_start, tokens_seen = time.perf_counter(), 0
    device = next(model.parameters()).device  # device-agnostic: batches follow the model (CPU here, CUDA for users)
    use_bf16 = cfg.bf16
    try:
        scoped.enter_context(_attention(model, attention))  # closed last: restored after the compile is undone
        scoped.enter_context(compiled_blocks(model, cfg.compile))
        while step < total_steps:
            epoch, k = divmod(step, steps_per_epoch)
            g = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
            perm = torch.randperm(len(train_rows), generator=g).tolist()
            batch = [train_rows[i] for i in perm[k * cfg.batch_size : (k + 1) * cfg.batch_size]]
            lr = _lr_at(step, total_steps, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            n_labels = sum(sum(1 for y in r["labels"][1:] if y != -100) for r in batch)
            loss_sum, step_tokens = 0.0, 0
            batch.sort(key=lambda r: len(r["input_ids"]))  # similar lengths share a micro-batch: less padding
            local = info.shard(batch)  # this rank's rows of the global batch
            for a in range(0, len(local), cfg.micro_batch_size):
                ids, labels, mask = (t.to(device) for t in _collate(local[a : a + cfg.micro_batch_size], pad_id))
                if info.fsdp:  # reduce-scatter once, after the last micro-batch
                    set_gradient_sync(loss_of, a + cfg.micro_batch_size >= len(local))
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    s, _ = loss_of(ids, labels, mask)
                (s / max(n_labels, 1)).backward()
                loss_sum += float(s.detach())
                step_tokens += int(mask.sum())
            if not info.fsdp:
                all_reduce_grads(params, info)
            loss_sum, step_tokens = all_reduce_sum([loss_sum, float(step_tokens)], info)
            tokens_seen += int(step_tokens)
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            loss = loss_sum / max(n_labels, 1)
            rate = tokens_seen / (time.perf_counter() - t_start)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:.0f}")
            bar.update(1)
            record: dict[str, Any] = {"step": step, "epoch": epoch, "loss": loss, "lr": lr, "tokens_per_s": rate,
                                      "tokens": tokens_seen}  # input tokens (all ranks) since this process started
            epoch_end = step % steps_per_epoch == 0 or step == total_steps
            if epoch_end and val_rows:
                val = evaluate_loss(model, val_rows, pad_id, cfg.micro_batch_size, use_bf16, info, loss_of)
                record["val_loss"] = val
                history.append({"epoch": epoch + 1, "step": step, "val_loss": val})
                if val < best:
                    best = val
                    _save_adapter(model, info, save_best, out, {"best_epoch": epoch + 1, "best_val_loss": val,
                                                                "history": history})
            elif epoch_end and not val_rows:
                _save_adapter(model, info, save_best, out, {"best_epoch": epoch + 1, "history": history})
            if metrics_log is not None:
                metrics_log.write(json.dumps(record) + "\n")
                metrics_log.flush()
            if cfg.save_every and (step % cfg.save_every == 0 or step == total_steps) and (info.is_main or info.fsdp):
                tensors = _checkpoint_tensors(named, opt, whole)  # FSDP: every rank gathers
                if info.is_main:
                    state = {"step": step, "best_val_loss": best, "history": history, "config": cfg.resume_key(),
                             "run": run}
                    _save_checkpoint(ckpt, tensors, state)
    finally:
        scoped.close()
        bar.close()
        if metrics_log is not None:
            metrics_log.close()
    barrier(info)
    best_epoch = min(history, key=lambda h: h["val_loss"])["epoch"] if history else epochs
    return {
        "steps": step,
        "epochs": epochs,
        "best_epoch": best_epoch,
        "best_val_loss": best if history else None,
        "history": history,
        "tokens_per_s": tokens_seen / max(time.perf_counter() - t_start, 1e-9),
    }
