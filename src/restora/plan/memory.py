"""Memory planner: how much memory a QLoRA training run or a PLR inference server needs.

Post LoRA Restoration (the PLR report) picks the training base precision k by training memory
and the inference base precision l > k by inference memory; the seed leaves open "how much
spare memory PLR needs". This module answers it from a model's config alone (no weights
are loaded), itemising:

    train     framework + W0 at k bits + float parts + adapter + gradients + optimizer states
              + saved activations for a micro-batch (B, T) + the largest backward transient
    serve     framework + W0 at l bits + float parts + N adapters + KV cache (B, T)
              + the prefill transient (logits of the whole prompt)
    quantize  framework + W0 at k bits + float parts (what `restora quantize` builds and writes)
    restore   the same at l bits, plus the adapter (what `restora restore` builds and writes)

Building the base streams the source (restora.models.stream) and is a phase of its own, before the first
step or request: the peak is what stays resident plus the larger of that phase's transient (`load_items`: one
float layer, or one GPTQ block with its Hessians) and the working phase's.

Storage follows restora's formats exactly: see `restora.plan.shape.linear_bytes`, which tests check
against `QuantizedWeight.nbytes()`. Activation counts
follow what autograd saves in a Llama-style decoder layer under restora's trainer (bf16
autocast, frozen base whose QuantLinear saves nothing, LoRA saving its input); they were
checked with `torch.autograd.graph.saved_tensors_hooks`. The framework constant and the
checks against measured peak RSS are in benchmarks/plan_accuracy.py.

The estimate is of live memory: it assumes freed tensors go back to the OS. glibc's default
(a dynamic mmap threshold) keeps freed activation memory in the heap, so training RSS grows
past the plan (by ~40% after two steps on SmolLM2); setting MALLOC_MMAP_THRESHOLD_=131072, or
`mallopt(M_MMAP_THRESHOLD, 128 KiB)` at start-up, makes the process match it.

The activation counts are those of eager, padded training unless `compiled=True`, which
counts what compiled blocks (restora.kernels.compiled, the default of `restora train` for 50M+
parameter models) save: each distinct block input once, the fused loss's bf16 logits and
gradient, a 4-bit base's dequantized weights, and torch.compile's own state (measured). Rows
are planned full length, so restora.kernels.unpadded's padding-free forward changes nothing there.
Choosing among plans (the precision ladder, the budget, `restora plan`) is in
restora.plan.choice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from restora.plan.shape import DTYPE_BYTES, ModelShape, linear_bytes
from restora.plan.sizes import format_bytes, parse_budget
from restora.quant.spec import QuantSpec

__all__ = ["ModelShape", "Item", "MemoryPlan", "parse_budget", "format_bytes", "linear_bytes", "load_items", "plan_memory"]

# Resident set of Python + torch + transformers + restora's command line + a tokenizer, before any model:
# `python -c "import restora.cli"` and SmolLM2's tokenizer, measured with /usr/bin/time (398 MiB, CPU build of
# torch 2.13, transformers 5.25).
FRAMEWORK_BYTES = 400 * 2**20
# What `restora serve` adds to it: FastAPI and uvicorn (15 MiB more, measured the same way) and the threads of the
# engine, the tokenizer pool and the event loop (the 1B benchmark's server ran 34 MiB above its plan without
# this item: benchmarks/scale.py).
SERVER_BYTES = 48 * 2**20
LOGIT_CHUNK = 1024  # restora.train.loop.LOGIT_CHUNK: label positions projected to the vocabulary at once
LOGIT_BYTES = 12  # bytes per (label, vocab) entry live while one chunk's CE is differentiated
# compiled: the head's bf16 logits and bf16 gradient (restora.kernels.head_loss fuses the fp32 softmax in between)
COMPILED_LOGIT_BYTES = 4
# torch.compile's in-process state while training compiled blocks (dynamo, inductor, the compiled kernels):
# the gap between measured peak and the plan without it, SmolLM2 float and RTN4 with checkpointing
# (benchmarks/plan_accuracy.py, "compiled" rows)
COMPILE_BYTES = 260 * 2**20
ADAM8_MIN_SIZE, ADAM8_BLOCK = 4096, 256  # restora.train.optim8bit: smaller tensors keep fp32 moments

Mode = Literal["train", "serve", "quantize", "restore"]


@dataclass(frozen=True)
class Item:
    """One line of a plan: what, how many bytes, and how it was counted."""

    name: str
    bytes: int
    note: str = ""
    transient: bool = False  # live only during one phase: counted in the peak of its phase
    phase: str = "step"  # for a transient item: "load" (while the base is built) or "step" (while it works)


@dataclass
class MemoryPlan:
    """An itemised estimate of peak resident memory for one setting."""

    mode: str
    label: str  # e.g. "rtn-4b-g64, LoRA r16 all, micro-batch 8 x 256"
    format: str
    bits: int
    items: list[Item] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """The peak: what stays resident, plus the larger of the loading phase's and the working phase's
        transients (the base is built before the first step or request, so the two never overlap)."""
        resident = sum(i.bytes for i in self.items if not i.transient)
        phases = [sum(i.bytes for i in self.items if i.transient and i.phase == ph) for ph in ("load", "step")]
        return resident + max(phases)

    @property
    def static(self) -> int:
        """Resident before the workload starts: framework, weights and adapters."""
        return sum(i.bytes for i in self.items if i.name in _STATIC)

    def table(self, budget: int | None = None) -> str:
        w = max(len(i.name) for i in self.items)
        rows = [f"{i.name:<{w}}  {format_bytes(i.bytes):>10}  {i.note}"
                + (" (while the base loads; not at the same time as the step)" if i.transient and i.phase == "load" else "")
                for i in self.items]
        rows.append(f"{'total (peak)':<{w}}  {format_bytes(self.total):>10}")
        if budget is not None:
            verdict = "fits" if self.total <= budget else "does NOT fit"
            rows.append(f"{'budget':<{w}}  {format_bytes(budget):>10}  {verdict}, {format_bytes(abs(budget - self.total))}"
                        f" {'spare' if self.total <= budget else 'short'}")
        return "\n".join(rows)


_STATIC = {"framework", "base linear weights", "float weights", "adapter parameters", "adapters"}


def _adapter_params(shape: ModelShape, adapter: str, rank: int, targets: str) -> list[int]:
    """Element counts of every adapter tensor of one adapter."""
    if adapter == "lora":
        return [n for _, o, i in shape.targets(targets) for n in (rank * i, o * rank)] * shape.layers
    if adapter == "ia3":  # one vector per target: input side for the down projection, else output side
        return [i if name == "down_proj" else o for name, o, i in shape.targets("ia3")] * shape.layers
    raise ValueError(f"adapter must be lora or ia3, got {adapter!r}")


def _optimizer_bytes(sizes: list[int], optimizer: str) -> int:
    if optimizer == "adamw":
        return 8 * sum(sizes)
    if optimizer in ("adamw8bit", "paged_adamw8bit"):  # 2 uint8 moments + fp32 absmax per 256 (restora.train.optim8bit)
        return sum(2 * n + 8 * -(-n // ADAM8_BLOCK) if n >= ADAM8_MIN_SIZE else 8 * n for n in sizes)
    raise ValueError(f"optimizer must be adamw, adamw8bit or paged_adamw8bit, got {optimizer!r}")


def _layer_activation_bytes(shape: ModelShape, adapter: str, rank: int, targets: str, act: int, res: int,
                            dropout: float) -> int:
    """Bytes autograd saves per token in one decoder layer (no checkpointing)."""
    H, I, d = shape.hidden, shape.intermediate, shape.head_dim
    n = 2 * H * res + 2 * 4  # the two RMSNorms: residual input and 1/rms
    n += (2 * shape.heads + 2 * shape.kv_heads) * d * act + 4 * shape.heads  # SDPA: q, k, v, output, logsumexp
    n += (3 if shape.gated_mlp else 2) * I * act  # gate and up projections, their activation
    if adapter == "lora":
        for _, _, i in shape.targets(targets):  # LoRA A saves its input (cast to the compute dtype), B saves A x
            n += i * act + rank * act + (4 * i if dropout > 0 else 0)  # CPU dropout keeps an fp32 noise mask
    else:
        n += sum(i if name == "down_proj" else o for name, o, i in shape.targets("ia3")) * act
    return n


def _compiled_layer_activation_bytes(shape: ModelShape, adapter: str, rank: int, targets: str, act: int, res: int,
                                     dropout: float) -> int:
    """Bytes a compiled block (restora.kernels.compiled) saves per token: each distinct input once.

    Counted with saved_tensors_hooks on SmolLM2 (all-linear LoRA r16, bf16): the two residual
    inputs of the norms, the two normed inputs (shared by q/k/v and by gate/up), the o_proj
    input, q, k, v and the attention output, gate, up and the down input, each LoRA A output,
    two 1/rms values: 18,280 bytes per token and layer, as this formula gives."""
    if adapter != "lora":
        return _layer_activation_bytes(shape, adapter, rank, targets, act, res, dropout)
    H, I, d = shape.hidden, shape.intermediate, shape.head_dim
    n = 2 * H * res + 2 * 4  # residual inputs of the two norms, their 1/rms
    n += (2 * H + shape.heads * d) * act  # normed attention and MLP inputs, o_proj input
    n += (2 * shape.heads + 2 * shape.kv_heads) * d * act  # q, attention output, k, v
    n += (3 if shape.gated_mlp else 2) * I * act  # gate and up outputs, down input
    for _, _, i in shape.targets(targets):
        n += rank * act + (4 * i if dropout > 0 else 0)  # A x; CPU dropout keeps an fp32 noise mask
    return n


def _cached_value_bytes(float_bytes: int, act_bytes: int) -> int:
    """Bytes per cached V entry in the server's transformers cache. K leaves RoPE in the float dtype (fp32 cos/sin
    promote it); V is stored as v_proj made it from transformers 5.24 on (bf16 under autocast), in the float dtype
    before (measured with 5.23 and 5.24: tests/test_plan.py checks the installed one against a real cache)."""
    try:
        import transformers
        from packaging.version import Version

        if Version(transformers.__version__).release < (5, 24):
            return float_bytes
    except (ImportError, ValueError):
        pass
    return act_bytes


def _kernel_layout_bytes(shape: ModelShape, format: str, bits: int, group_size: int) -> int:
    """What bf16 decoding of a 4-bit base keeps beside the stored weights (restora.kernels.int4, uniform.py):
    restora's int4 kernel layout (codes + fp32 scales and zeros), or where that kernel cannot run, torch's int4
    GEMV layout for uniform formats (codes + bf16 scale pairs, smaller). Counted as the kernel's whatever the CPU,
    so a plan made elsewhere still fits a machine that has the kernel."""
    if bits != 4 or format not in ("rtn", "gptq", "nf4", "fp4"):
        return 0
    n = shape.linear_params()
    groups = shape.layers * sum(o * (i // (i if group_size == -1 else group_size)) for _, o, i in shape.linears())
    return n // 2 + groups * 2 * 4


GPTQ_INPUT_BYTES = 512 * 2**20  # restora.quant.gptq.INPUT_BYTES
QUANTIZE_CHUNK_BYTES = 32 * 2**20  # the formats' chunked fp32 / int64 temporaries (restora.quant: ~1M weights at a time)


def load_items(shape: ModelShape, format: str, bits: int, source_bytes: int, calib_tokens: int = 0,
               from_cache: bool = False) -> list[Item]:
    """What building the base holds beyond its final state, at the peak of loading (restora.models.stream).

    The source streams tensor by tensor into place, so a float base costs nothing extra. A quantized base is
    quantized as it streams: NF4/FP4, int8 and RTN hold one layer's float weight and that layer's code
    temporaries; GPTQ holds one decoder block's float weights, its calibration inputs (fp32) and, for the widest
    layer, the Hessian and its inverse Cholesky factor with the layer group's fp32 weights. A base read back from
    restora's cache (a quantized checkpoint) is assigned tensor by tensor: nothing beyond the final state."""
    if format == "float" or from_cache:
        return []
    linears = shape.linears()
    if format != "gptq":
        o, i = max(((o, i) for _, o, i in linears), key=lambda oi: oi[0] * oi[1])
        codes = 0 if format == "int8" else 3 * o * i // 2
        return [Item("loading", o * i * source_bytes + codes + QUANTIZE_CHUNK_BYTES,
                     f"one {o} x {i} layer in the source dtype + its codes being made", transient=True, phase="load")]
    block = sum(o * i for _, o, i in linears) * source_bytes
    groups = {"attn": [l for l in linears if l[0] in ("q_proj", "k_proj", "v_proj")], "o": [linears[3]],
              "mlp": [l for l in linears[4:] if l[0] != "down_proj"], "down": [l for l in linears if l[0] == "down_proj"]}
    inputs = calib_tokens * sum(g[0][2] for g in groups.values() if g) * 4
    if inputs > GPTQ_INPUT_BYTES:  # restora.quant.gptq keeps a running Σ XᵀX per input past this
        inputs = GPTQ_INPUT_BYTES + sum(g[0][2] ** 2 for g in groups.values() if g) * 4
    # per layer group (restora.quant.gptq): H, its Cholesky factor, the identity and the inverse factor (in, in),
    # and the group's weights three times in fp32 (the concatenation, its transpose, the codes being chosen)
    work = max(4 * g[0][2] ** 2 * 4 + 3 * sum(o for _, o, _ in g) * g[0][2] * 4 for g in groups.values() if g)
    rows = 2 * calib_tokens * shape.hidden * source_bytes
    return [Item("loading", 2 * block + inputs + work + rows,
                 f"GPTQ: one block in the source dtype and its quantized stand-in, {calib_tokens} calibration "
                 "tokens' inputs, the widest layer's Hessian work", transient=True, phase="load")]


def plan_memory(
    config: Any,
    mode: Mode = "serve",
    format: str = "nf4",
    bits: int = 4,
    group_size: int = 64,
    double_quant: bool = False,
    float_dtype: str = "fp32",
    batch_size: int = 8,
    seq_len: int = 512,
    adapter: str = "lora",
    rank: int = 16,
    targets: str = "all",
    adapters: int = 1,
    optimizer: str = "adamw",
    grad_checkpointing: bool = False,
    bf16: bool = True,
    dropout: float = 0.05,
    prompt_len: int | None = None,
    framework_bytes: int = FRAMEWORK_BYTES,
    compiled: bool = False,
    source_dtype: str | None = None,
    calib_tokens: int = 0,
    from_cache: bool = False,
    offload: bool = False,
) -> MemoryPlan:
    """Itemised peak memory of training (base at k = `bits`) or serving (base at l = `bits`).

    config: a transformers config (or a ModelShape). train: one micro-batch of `batch_size`
    rows x `seq_len` tokens, every position labelled (the worst case). serve: `adapters`
    adapters, a KV cache of `batch_size` x `seq_len` tokens, prefill of `prompt_len`
    (default seq_len) tokens. float_dtype: storage of embeddings, norms, LM head (and all
    weights of a float base). bf16: compute under bf16 autocast, as restora does on CPU.
    compiled: train with compiled blocks (`restora train --compile`), which save each
    distinct input once and fuse the loss's element-wise work.
    source_dtype: storage of the source checkpoint (default: float_dtype); with it, the plan counts building the
    base by streaming the source (restora.models.stream): `load_items`, a phase before the first step.
    quantize: `restora quantize` (the base built and written; calib_tokens of GPTQ calibration).
    from_cache: the base comes from restora's cache of quantized bases (no quantization while loading).
    offload: serve with the decoder blocks paged in from their file a block at a time (restora.models.offload):
    two blocks' weights resident (the running one and the one read ahead), no packed or kernel copies.
    """
    _check_plan(mode, format, bits, group_size, double_quant, float_dtype, source_dtype, batch_size, seq_len, rank,
                adapters, offload)
    shape = config if isinstance(config, ModelShape) else ModelShape.from_config(config)
    fb = DTYPE_BYTES[float_dtype]
    act = 2 if bf16 else fb
    H, V, L = shape.hidden, shape.vocab, shape.layers
    label = "float" if format == "float" else f"{format}-{bits}b-g{group_size}" + ("-dq" if double_quant else "")
    lin = L * sum(linear_bytes(o, i, format, bits, group_size, double_quant, float_bytes=fb) for _, o, i in shape.linears())
    embed = V * H * (1 if shape.tied else 2) + shape.positions * H
    norms = (2 * L + 1) * H
    resident_blocks = min(2, L) if offload else L
    items = [
        Item("framework", framework_bytes, "Python, torch, transformers, restora, tokenizer (measured)"),
        Item("base linear weights", lin * resident_blocks // L, f"{label}: {shape.linear_params() / 1e6:.1f}M weights, "
             f"{8 * lin / shape.linear_params():.2f} bits each"
             + (f"; offloaded: {resident_blocks} of {L} blocks resident" if offload else "")),
        Item("float weights", (embed + norms) * fb, f"embeddings{'' if shape.tied else ' + LM head'} + norms, {float_dtype}"),
    ]
    if source_dtype is not None and not offload:  # an offloaded base maps a checkpoint written before
        items += load_items(shape, format, bits, DTYPE_BYTES[source_dtype], calib_tokens, from_cache)
    sizes = [] if mode == "quantize" else _adapter_params(shape, adapter, rank, targets)  # quantize: no adapter
    if mode in ("quantize", "restore"):  # restore: the l-bit base built from the source, plus the adapter
        settings = dict(mode=mode, format=format, bits=bits, group_size=group_size, float_dtype=float_dtype,
                        double_quant=double_quant, source_dtype=source_dtype, calib_tokens=calib_tokens,
                        framework_bytes=framework_bytes, adapter=adapter, rank=rank, targets=targets)
        if mode == "restore":
            items.append(Item("adapter", 2 * 4 * sum(sizes), f"{adapter} r{rank} {targets}, fp32, and its bytes "
                              "while safetensors writes them"))
        return MemoryPlan(mode, f"{label} {'checkpoint' if mode == 'quantize' else 'base + adapter'} from a "
                          f"{source_dtype or float_dtype} source", format, 16 if format == "float" else bits, items,
                          settings)
    what = f"LoRA r{rank} {targets}" if adapter == "lora" else "IA3"
    # kept once made: training's bf16 cast of a float head (restora.kernels.head_loss: none when the head is bf16
    # already), and the server's packed bf16 head (restora.kernels.packed: a copy in oneDNN's layout, whatever the
    # head's dtype; `restora serve` packs it on a CPU with bf16)
    head_cast = V * H * 2 if bf16 and (fb != 2 or mode == "serve") else 0
    if head_cast:
        items.append(Item("LM head bf16 copy", head_cast, f"{V} x {H} x 2 B, the head under bf16 autocast"
                          + (" (packed for decoding)" if mode == "serve" else "")))
    if mode == "serve":
        layouts = _kernel_layout_bytes(shape, format, bits, group_size) if bf16 and not offload else 0
        items += _serve_items(shape, fb, act, batch_size, seq_len, seq_len if prompt_len is None else prompt_len,
                              adapters, sizes, what, layouts)
        desc = f"{label} base{' (offloaded)' if offload else ''}, {adapters} x {what}, batch {batch_size} x {seq_len}"
    else:
        items += _train_items(shape, format, fb, act, batch_size, seq_len, adapter, rank, targets, dropout, sizes, what,
                              optimizer, grad_checkpointing, bf16, compiled)
        desc = f"{label} base, {what}, micro-batch {batch_size} x {seq_len}{', checkpointing' if grad_checkpointing else ''}"
    settings = dict(mode=mode, format=format, bits=bits, group_size=group_size, batch_size=batch_size, seq_len=seq_len,
                    rank=rank, targets=targets, adapter=adapter, adapters=adapters, optimizer=optimizer,
                    grad_checkpointing=grad_checkpointing, float_dtype=float_dtype, double_quant=double_quant,
                    bf16=bf16, dropout=dropout, prompt_len=prompt_len, framework_bytes=framework_bytes,
                    compiled=compiled, source_dtype=source_dtype, calib_tokens=calib_tokens, from_cache=from_cache,
                    offload=offload)
    return MemoryPlan(mode, desc, format, 16 if format == "float" else bits, items, settings)


def _check_plan(mode: str, format: str, bits: int, group_size: int, double_quant: bool, float_dtype: str,
                source_dtype: str | None, batch_size: int, seq_len: int, rank: int, adapters: int,
                offload: bool) -> None:
    """One-line errors for plan_memory's arguments."""
    if mode not in ("train", "serve", "quantize", "restore"):
        raise ValueError(f"mode must be train, serve, quantize or restore, got {mode!r}")
    if source_dtype is not None and source_dtype not in DTYPE_BYTES:
        raise ValueError(f"source_dtype must be one of {', '.join(DTYPE_BYTES)}, got {source_dtype!r}")
    if float_dtype not in DTYPE_BYTES:
        raise ValueError(f"float_dtype must be one of {', '.join(DTYPE_BYTES)}, got {float_dtype!r}")
    for name, v in (("batch_size", batch_size), ("seq_len", seq_len), ("rank", rank)):
        if v <= 0:
            raise ValueError(f"{name} must be positive, got {v}")
    if adapters < 0:
        raise ValueError(f"adapters must be >= 0, got {adapters}")
    if format != "float":
        QuantSpec(format=format, bits=bits, group_size=group_size, double_quant=double_quant)  # one-line errors
    if offload and mode != "serve":
        raise ValueError("offload plans a server (mode serve): training and quantizing hold their base")


def _serve_items(shape: ModelShape, fb: int, act: int, batch_size: int, seq_len: int, prompt_len: int, adapters: int,
                 sizes: list[int], what: str, layouts: int) -> list[Item]:
    """What a server holds beside its base: itself, the resident adapters, kernel layouts, the KV cache of
    `batch_size` x `seq_len` tokens, and a prefill of `prompt_len` tokens per row (transient)."""
    H, V, L = shape.hidden, shape.vocab, shape.layers
    items = [Item("server", SERVER_BYTES, "FastAPI, uvicorn, engine and tokenizer threads (measured)"),
             Item("adapters", adapters * 4 * sum(sizes), f"{adapters} x {what}, fp32")]
    if layouts:
        items.append(Item("4-bit kernel layouts", layouts, "codes re-laid for restora's int4 kernel, kept once "
                          "built: codes + fp32 scales and zeros"))
    vb = _cached_value_bytes(fb, act)
    kv = L * batch_size * seq_len * shape.kv_heads * shape.head_dim * (fb + vb)
    items.append(Item("KV cache", kv, f"{L} layers x {batch_size} x {seq_len} tokens x {shape.kv_heads} kv heads x "
                      f"{shape.head_dim} x (K at {fb} B + V at {vb} B)"))
    prefill = batch_size * prompt_len * V * act + batch_size * prompt_len * (3 * shape.intermediate + 4 * H) * 4
    items.append(Item("prefill transient", prefill, f"logits of {batch_size} x {prompt_len} prompt tokens, "
                      "one layer's work", transient=True))
    return items


def _train_items(shape: ModelShape, format: str, fb: int, act: int, batch_size: int, seq_len: int, adapter: str,
                 rank: int, targets: str, dropout: float, sizes: list[int], what: str, optimizer: str,
                 grad_checkpointing: bool, bf16: bool, compiled: bool) -> list[Item]:
    """What a training step holds beside its base: the adapter, its gradients and optimizer states, the
    activations saved for backward and one chunk of the loss (both transient)."""
    H, V, L = shape.hidden, shape.vocab, shape.layers
    n_params = sum(sizes)
    items = [Item("adapter parameters", 4 * n_params, f"{what}: {n_params / 1e6:.2f}M fp32"),
             Item("gradients", 4 * n_params, "adapter only, fp32"),
             Item("optimizer states", _optimizer_bytes(sizes, optimizer), optimizer)]
    N = batch_size * seq_len
    layer_bytes = _compiled_layer_activation_bytes if compiled else _layer_activation_bytes
    per_layer = layer_bytes(shape, adapter, rank, targets, act, fb, dropout)
    if grad_checkpointing:  # each layer keeps its input; one layer is recomputed at a time
        saved = N * (L * H * fb + per_layer)
        note = f"{batch_size} x {seq_len} tokens: layer inputs + one recomputed layer"
    else:
        saved = N * L * per_layer
        note = f"{batch_size} x {seq_len} tokens x {L} layers x {per_layer / 1024:.1f} KiB/token"
    saved += N * H * (fb + 4)  # final norm input, gathered label hidden states
    if bf16 and fb != 2:  # autocast keeps a bf16 copy of each trainable weight until backward
        saved += 2 * n_params
    if format == "float" and bf16 and fb != 2:  # frozen float layers under autocast save their bf16 weight
        saved += 2 * shape.linear_params()
        note += " + bf16 weight copies"
    elif compiled and format != "float" and not grad_checkpointing:  # compiled blocks keep dequantized weights
        saved += 2 * shape.linear_params()
        note += " + dequantized bf16 weights"
    if compiled:
        items.append(Item("compiler", COMPILE_BYTES, "torch.compile state in the process (measured)"))
    items.append(Item("activations", saved, note, transient=True))
    n_logit = min(batch_size * (seq_len - 1), LOGIT_CHUNK)
    per_logit = COMPILED_LOGIT_BYTES if compiled else LOGIT_BYTES
    items.append(Item("loss chunk", n_logit * V * per_logit,
                      f"{n_logit} label positions x {V} vocab x {per_logit} B", transient=True))
    return items


SERVE_LADDER: list[tuple[str, int]] = [("float", 16), ("int8", 8), ("nf4", 4), ("rtn", 4), ("rtn", 3), ("rtn", 2)]
