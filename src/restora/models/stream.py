"""Stream a safetensors checkpoint into a model built on the meta device, one tensor at a time.

QLoRA exists because the float model does not fit: a stage that first loads the whole model in float (and in
fp32, as `from_pretrained(dtype=float32)` does for a bf16 checkpoint) needs 2-3x the checkpoint's size before it
does any work. Here the model's parameters are created on `meta` (no memory), and each tensor is read from its
shard (a positioned read, no memory map), in the stored dtype unless asked otherwise, and assigned in place of its meta stand-in.

    files = CheckpointFiles(folder)             # model.safetensors, or the shards of model.safetensors.index.json
    model = empty_model(config)                 # parameters on meta, buffers (rotary tables) real
    load = StreamingLoad(model, files)
    load.outside_blocks()                       # embeddings, final norm, LM head
    for b in range(load.num_blocks):
        load.block(b, on_layer=quantize_it)     # one decoder block's tensors; each linear handed over when complete
    load.finish()                               # ties the head, checks nothing is left on meta

`on_layer(name, module)` sees each module as soon as all of its tensors have arrived, so a quantizer replaces a
linear layer while only that layer's float weight is resident: with NF4/int8/RTN, at most one layer's float
weight is ever held; GPTQ (restora.quant.gptq) holds one decoder block's.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from restora.core.jsonfile import read_json_object
from restora.core.modules import decoder_blocks
from restora.core.safetensors_file import Entry, read_header, read_tensor

__all__ = ["CheckpointFiles", "StreamingLoad", "empty_model", "parameters_on_meta", "INDEX", "SINGLE"]

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

class CheckpointFiles:
    """The tensors of a Hugging Face safetensors checkpoint (one file or sharded), read one at a time.

    Each tensor is read with a positioned read into its own new tensor (restora.core.safetensors_file), not
    through a memory map: a mapped shard's pages would count in the process's resident set until the whole shard
    is unmapped, so a streamed 8B model would show its checkpoint's size in RSS however little it kept.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            weight_map = read_json_object(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: field 'weight_map' is missing: expected a safetensors index")
            files = sorted({self.folder / f for f in weight_map.values()})
            missing = [p.name for p in files if not p.is_file()]
            if missing:
                raise FileNotFoundError(f"{index}: names shards that are missing: {', '.join(missing[:3])}")
        elif (self.folder / SINGLE).is_file():
            files = [self.folder / SINGLE]
        else:
            raise FileNotFoundError(f"{self.folder}: no {SINGLE} or {INDEX} (restora reads safetensors checkpoints)")
        self._maps: dict[Path, mmap.mmap] = {}
        self.where: dict[str, Path] = {}
        self._entries: dict[str, Entry] = {}
        for path in files:
            for name, entry in read_header(path).items():
                self.where[name] = path
                self._entries[name] = entry
        if index.is_file():
            wrong = [n for n, f in weight_map.items() if self.where.get(n) != self.folder / f]
            if wrong:
                raise ValueError(f"{index}: {wrong[0]} is not in the shard the index names")

    def names(self) -> list[str]:
        return list(self.where)

    def get(self, name: str, mapped: bool = False) -> torch.Tensor:
        """The tensor `name` as stored (its dtype, on the CPU): in memory of its own, or (`mapped`) a view of a
        private copy-on-write mapping of its file, whose pages are read when first touched (offloading)."""
        if not mapped:
            return read_tensor(self.where[name], self._entries[name], name)
        path = self.where[name]
        if path not in self._maps:
            with open(path, "rb") as f:
                self._maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        dtype, shape, start, end = self._entries[name]
        if end == start:
            return torch.empty(shape, dtype=dtype)
        raw = torch.frombuffer(self._maps[path], dtype=torch.uint8, count=end - start, offset=start)
        return raw.view(dtype).reshape(shape)

    def dtype(self, name: str) -> torch.dtype | None:
        """The stored dtype of `name` (None for non-float tensors)."""
        dtype = self._entries[name][0]
        return dtype if dtype.is_floating_point else None

    def float_dtype(self) -> torch.dtype:
        """The dtype most of the checkpoint's float tensors are stored in (fp32 if it holds none)."""
        counts: dict[torch.dtype, int] = {}
        for name in self.where:
            dt = self.dtype(name)
            if dt is not None:
                counts[dt] = counts.get(dt, 0) + 1
        return max(counts, key=counts.__getitem__) if counts else torch.float32

    def stats(self) -> list[tuple[str, int, int]]:
        """(file name, size, mtime in ns) of every file: what a cached digest of the checkpoint is keyed by."""
        files = sorted(set(self.where.values()))
        return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]

    def close(self) -> None:
        """Forget the file mappings (tensors that view them keep them alive as long as they live)."""
        self._maps.clear()


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every nn.Parameter created in the `with` body lives on `meta`; buffers stay real.

    Buffers that no checkpoint holds (rotary frequency tables) are computed by the modules' constructors and stay
    correct; parameters cost nothing until a tensor is assigned in their place. A layer's constructor allocates its
    parameter with torch.empty (untouched pages, no resident memory) before it is moved here, and initialises the
    meta copy (no work).
    """
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def empty_model(config: Any, dtype: torch.dtype | None = None) -> nn.Module:
    """The causal LM of `config` with every parameter on meta (tied weights tied), in eval mode."""
    from transformers import AutoModelForCausalLM

    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    return model.eval()



class StreamingLoad:
    """Fill a meta-initialised model from CheckpointFiles, block by block (see the module docstring)."""

    def __init__(self, model: nn.Module, files: CheckpointFiles, dtype: torch.dtype | None = None,
                 mapped: bool = False) -> None:
        if mapped and dtype is not None:
            raise ValueError("a mapped load keeps the stored dtype: pass dtype=None")
        self.model, self.files, self.dtype, self.mapped = model, files, dtype, mapped
        self.targets = model.state_dict(keep_vars=True)
        unknown = [n for n in files.names() if n not in self.targets]
        if unknown:
            raise ValueError(f"{files.folder}: tensors the model of its config.json does not have: {unknown[:3]}")
        blocks = decoder_blocks(model)
        self.num_blocks = len(blocks)
        self.prefix = next(n for n, m in model.named_modules() if m is blocks) + "."
        self._by_block: dict[int | None, list[str]] = {}
        for name in files.names():
            b = int(name[len(self.prefix):].split(".", 1)[0]) if name.startswith(self.prefix) else None
            self._by_block.setdefault(b, []).append(name)
        # what each module still waits for: its own parameters and persistent buffers held by the checkpoint
        self._pending: dict[str, set[str]] = {}
        for name in files.names():
            module, _, attr = name.rpartition(".")
            self._pending.setdefault(module, set()).add(attr)
        self.loaded_bytes = 0
        self._outside_done = False

    def _assign(self, name: str) -> str:
        t = self.files.get(name, mapped=self.mapped)
        if self.dtype is not None and t.is_floating_point():
            t = t.to(self.dtype)
        module_name, _, attr = name.rpartition(".")
        module = self.model.get_submodule(module_name)
        if attr in module._parameters:
            old = module._parameters[attr]
            if tuple(old.shape) != tuple(t.shape):
                raise ValueError(f"{self.files.where[name]}: {name} has shape {tuple(t.shape)}, "
                                 f"the model of its config.json expects {tuple(old.shape)}")
            module._parameters[attr] = nn.Parameter(t, requires_grad=old.requires_grad and t.is_floating_point())
        else:
            module._buffers[attr] = t
        self.loaded_bytes += t.numel() * t.element_size()
        return module_name

    def _load(self, names: list[str], on_layer: Callable[[str, nn.Module], None] | None) -> None:
        for name in sorted(names):
            module_name = self._assign(name)
            waiting = self._pending[module_name]
            waiting.discard(name.rpartition(".")[2])
            if not waiting and on_layer is not None:
                on_layer(module_name, self.model.get_submodule(module_name))

    def outside_blocks(self, on_layer: Callable[[str, nn.Module], None] | None = None) -> None:
        """Embeddings, final norm and LM head: every tensor outside the decoder blocks (once; again is a no-op)."""
        if self._outside_done:
            return
        self._outside_done = True
        self._load(self._by_block.get(None, []), on_layer)
        self.model.tie_weights()  # a tied head takes the embedding just loaded

    def block(self, b: int, on_layer: Callable[[str, nn.Module], None] | None = None) -> None:
        """Decoder block b's tensors; `on_layer(name, module)` for each module once all of its tensors are in."""
        self._load(self._by_block.get(b, []), on_layer)

    def finish(self) -> nn.Module:
        """Tie the head again and check that no parameter or buffer is left on meta."""
        self.model.tie_weights()
        left = [n for n, t in [*self.model.named_parameters(), *self.model.named_buffers()] if t.is_meta]
        if left:
            raise ValueError(f"{self.files.folder}: the checkpoint has no tensor for {left[:3]}"
                             f"{f' and {len(left) - 3} more' if len(left) > 3 else ''}")
        return self.model

    def all(self, on_layer: Callable[[str, nn.Module], None] | None = None) -> nn.Module:
        """Every tensor, block by block; returns the model."""
        self.outside_blocks(on_layer)
        for b in range(self.num_blocks):
            self.block(b, on_layer)
        return self.finish()
