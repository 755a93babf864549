"""The server `restora serve` runs: one base at the precision the memory budget allows, many adapters, one HTTP API.

Post LoRA Restoration (the PLR report) at serving time: adapters trained on a k-bit base are served
on the highest-precision base l >= k that fits the server's memory with the adapters it keeps
resident and the KV cache of a full batch. `--bits auto` asks restora.plan.choice for that l
(serve_candidates -> choose_plan); the choice and its itemised plan are printed at start and
reported by GET /health. A plan that does not fit the budget (explicit --bits, a quantized
checkpoint) is refused before the server starts, unless `allow_over_budget` says otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from restora.adapters.multi import MultiAdapterModel
from restora.adapters.files import CONFIG_NAME
from restora.models.bases import BaseChoice, build_base
from restora.models.load import MANIFEST, load_model, resolve_source
from restora.models.offload import offload as offload_blocks
from restora.plan.choice import choose_plan, serve_candidates, source_dtype
from restora.plan.memory import MemoryPlan, format_bytes, parse_budget, plan_memory
from restora.quant.spec import QuantSpec
from restora.restore.plr import restore_spec
from restora.serve.adapters_root import AdapterPathError, AdapterRoot, ResidentAdapters
from restora.serve.app import ServeLimits, ServerInfo, create_app
from restora.serve.engine import Engine, EngineConfig

__all__ = ["build_server", "serve_plan"]

GROUP_SIZE = 64  # divides SmolLM2's 576 (128 does not)


def _adapter_rank(root: Any) -> int:
    """The largest LoRA rank among the adapter folders directly under the root (16 if none)."""

    ranks = []
    for child in sorted(root.root.iterdir()):
        try:
            folder = root.resolve(child.name)
            root.check_files(folder)
        except AdapterPathError:
            continue  # symlinks out of the root are never read
        if (folder / CONFIG_NAME).is_file():
            try:
                r = json.loads((folder / CONFIG_NAME).read_text()).get("r")
            except (json.JSONDecodeError, OSError):
                continue
            if isinstance(r, int) and r > 0:
                ranks.append(r)
    return max(ranks, default=16)


def serve_plan(config: Any, bits: str, format: str | None, budget: int, max_batch: int, seq_len: int, adapters: int,
               rank: int, prefill_tokens: int, offload: bool = False) -> tuple[MemoryPlan, bool]:
    """The serve plan in force and whether it fits: auto = the highest l within `budget`.

    KV cache: max_batch rows of seq_len tokens; prefill: at most `prefill_tokens` padded prompt
    tokens at once (the engine's max_prefill_tokens), i.e. max_batch rows of prefill_tokens / max_batch.
    """
    kw: dict[str, Any] = dict(batch_size=max_batch, seq_len=seq_len, adapters=adapters, rank=rank, group_size=GROUP_SIZE,
                              prompt_len=max(1, -(-prefill_tokens // max_batch)), offload=offload,
                              float_dtype=source_dtype(config))  # the base's float parts, held as stored
    if bits == "auto":
        try:
            return choose_plan(serve_candidates(config, format, **kw), budget), True
        except ValueError as e:
            raise ValueError(f"{e} (KV cache for --max-batch {max_batch} x {seq_len} tokens: raise --memory-budget or "
                             "lower --max-batch, --max-prompt-tokens or --max-tokens-limit)") from None
    if not bits.isdigit():
        raise ValueError(f"--bits must be auto or a number of bits (2, 3, 4, 8, 16), got {bits!r}")

    spec = restore_spec(None, int(bits), format, GROUP_SIZE)
    p = plan_memory(config, "serve", format="float" if spec.is_float else spec.format, bits=spec.bits, **kw)
    return p, p.total <= budget


def _check_fits(plan: MemoryPlan, fits: bool, budget: int, allow_over_budget: bool) -> None:
    if not fits and not allow_over_budget:
        raise ValueError(f"the serve plan ({plan.label}) needs {format_bytes(plan.total)}, over the memory budget of "
                         f"{format_bytes(budget)}: raise --memory-budget, lower --bits, --max-batch, --max-prompt-tokens, "
                         "--max-tokens-limit or --max-loaded-adapters, or pass --allow-over-budget")


def build_server(
    model: str, adapters_root: str, bits: str = "auto", format: str | None = None, memory_budget: str = "4GiB",
    max_batch: int = 32, max_queue: int = 256, max_loaded_adapters: int = 8, max_tokens_limit: int = 512,
    max_prompt_tokens: int = 2048, max_body_bytes: int = 1_000_000, bf16: bool = True, verbose: bool = True,
    allow_over_budget: bool = False, drain_timeout: float | None = 30.0, offload: bool = False,
) -> Any:
    """The FastAPI app with its engine started: plan, build the base at l bits, wrap it for adapters.

    ValueError when the plan exceeds `memory_budget` (unless `allow_over_budget`); the engine drains for at
    most `drain_timeout` seconds when the app shuts down. `offload` keeps the base's decoder blocks in their file
    and pages them in a block at a time (restora.models.offload): the plan counts two blocks resident."""
    from transformers import AutoConfig

    limits = ServeLimits(max_tokens_limit, max_prompt_tokens, max_body_bytes)
    engine_config = EngineConfig(max_batch=max_batch, max_queue=max_queue, max_prefill_tokens=max_prompt_tokens, bf16=bf16)
    root = AdapterRoot(adapters_root)
    budget = parse_budget(memory_budget)
    source = resolve_source(model)
    if (Path(source) / MANIFEST).is_file():  # a quantized checkpoint: served at its own precision
        loaded = load_model(model, mapped=offload)
        spec = QuantSpec.from_dict(loaded.manifest["quantization"])  # type: ignore[index]
        plan, fits = serve_plan(loaded.model.config, str(spec.bits), spec.format, budget, max_batch,
                                max_prompt_tokens + max_tokens_limit, max_loaded_adapters, _adapter_rank(root),
                                max_prompt_tokens, offload)
        _check_fits(plan, fits, budget, allow_over_budget)
        how = "a quantized checkpoint, served as is"
    else:
        config = AutoConfig.from_pretrained(str(source))
        plan, fits = serve_plan(config, bits, format, budget, max_batch, max_prompt_tokens + max_tokens_limit,
                                max_loaded_adapters, _adapter_rank(root), max_prompt_tokens, offload)
        _check_fits(plan, fits, budget, allow_over_budget)  # before the base is built
        spec = QuantSpec("float", 16) if plan.format == "float" else QuantSpec(plan.format, plan.bits, GROUP_SIZE)
        how = "PLR choice: the highest l that fits" if bits == "auto" else f"--bits {bits}"
        loaded = build_base(model, BaseChoice(spec), mapped=offload)
    if offload:
        offload_blocks(loaded.model)
        how += ", offloaded (decoder blocks paged in from the file)"
    name = Path(model).name if Path(model).exists() else model
    plan_info = {"label": plan.label, "format": plan.format, "bits": plan.bits, "total_bytes": plan.total,
                 "budget_bytes": budget, "fits": fits, "how": how,
                 "items": [{"name": i.name, "bytes": i.bytes, "note": i.note} for i in plan.items]}
    info = ServerInfo(name, "float" if spec.is_float else spec.format, 16 if spec.is_float else spec.bits,
                      spec.group_size, plan_info)
    resident = ResidentAdapters(MultiAdapterModel(loaded.model), root, max_loaded_adapters, loaded.source_hash)
    engine = Engine(loaded.model, loaded.tokenizer, resident, engine_config)
    engine.start()
    if verbose:
        print(f"restora serve: {name} at {info.format} {info.bits}-bit ({how}; budget {format_bytes(budget)}, "
              f"plan {format_bytes(plan.total)}{'' if fits else ', does NOT fit'})")
        print(plan.table(budget))
    return create_app(engine, info, limits, drain_timeout)
