"""Adapters a server may load: names resolved only inside one root folder, and an LRU of the
resident ones (S-LoRA, Sheng et al. 2023, arXiv:2311.03285: many adapters on disk, a few in
memory, swapped by use).

`AdapterRoot.resolve` turns a request's adapter name or a load request's `lora_path` into a
folder under the root, and refuses (AdapterPathError, an HTTP 400) anything else before a byte
is read: absolute paths, `..` parts, and names whose resolved path (symlinks followed) leaves
the root. The files an adapter load reads (config, weights, provenance) are checked the same
way, so a folder inside the root cannot smuggle in a symlinked file from outside.

`ResidentAdapters` keeps at most `max_loaded` adapters in a MultiAdapterModel. `ensure(name)`
loads lazily and evicts the least recently used adapter that no running row needs. Only the
engine thread calls it: the model changes only between forward passes. Every way an adapter
folder can fail to load (missing or truncated weights, a malformed config, NaN/inf weights, a
base it was not trained for) is one AdapterLoadError (an HTTP 400) that names the adapter and
never a server path (`public_message`).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Collection
from pathlib import Path, PurePosixPath

from restora.adapters.multi import MultiAdapterModel
from restora.adapters.files import CONFIG_NAME, PROVENANCE_NAME, WEIGHTS_NAME

__all__ = ["AdapterPathError", "AdapterRoot", "AdapterBusyError", "AdapterLoadError", "ResidentAdapters",
           "public_message"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class AdapterPathError(ValueError):
    """An adapter name or path that is not a folder inside the adapters root."""


class AdapterBusyError(RuntimeError):
    """No adapter slot can be freed now: every resident adapter serves a running request."""


class AdapterLoadError(ValueError):
    """An adapter folder inside the root that cannot be loaded; the message names the adapter, not its path."""


_ABS_PATH = re.compile(r"(?<![\w.])/(?:[^\s'\"/:,;()]+/)+([^\s'\"/:,;()]+)")


def public_message(text: str, *folders: Path) -> str:
    """`text` with server paths removed: `folders` (and anything below them) become relative, any other absolute
    path shrinks to its last part. One line, at most 500 characters."""
    for folder in folders:
        text = text.replace(f"{folder}/", "").replace(str(folder), ".")
    text = _ABS_PATH.sub(lambda m: m.group(1), text)
    text = " ".join(text.split())
    return text if len(text) <= 500 else text[:497] + "..."


class AdapterRoot:
    """The one folder adapters are read from."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise NotADirectoryError(f"--adapters-root {root}: not a folder")

    def check_name(self, name: str) -> str:
        """An adapter's served name: letters, digits, '.', '_', '-', at most 128, no leading dot."""
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name in (".", ".."):
            raise AdapterPathError(f"adapter name {name!r} is not allowed: expected letters, digits, '.', '_' or '-'")
        return name

    def resolve(self, path: str) -> Path:
        """`path` (relative to the root) as an absolute folder inside the root; nothing is read."""
        if not isinstance(path, str) or not path or "\x00" in path:
            raise AdapterPathError(f"adapter path {path!r} is not a relative path inside the adapters root")
        if len(path) > 1024:
            raise AdapterPathError(f"adapter path of {len(path)} characters is too long (at most 1024)")
        pure = PurePosixPath(path.replace("\\", "/"))
        if any(len(part) > 255 for part in pure.parts):
            raise AdapterPathError("adapter path has a part longer than 255 characters")
        if pure.is_absolute() or re.match(r"^[A-Za-z]:", path) or ".." in pure.parts:
            raise AdapterPathError(f"adapter path {path!r} must be relative to the adapters root, without '..'")
        try:
            full = (self.root / pure).resolve()  # follows symlinks
        except (OSError, RuntimeError):  # a loop of links (RuntimeError before Python 3.13)
            raise AdapterPathError(f"adapter path {path!r} cannot be resolved (a loop of links?)") from None
        if not full.is_relative_to(self.root) or full == self.root:
            raise AdapterPathError(f"adapter path {path!r} resolves outside the adapters root")
        return full

    def exists(self, folder: Path) -> bool:
        try:
            return (folder / CONFIG_NAME).is_file()
        except OSError:  # unreadable, a loop of links, ...: not an adapter folder
            return False

    def check_files(self, folder: Path) -> None:
        """Refuse a folder whose config, weights or provenance file is a symlink out of the root."""
        for name in (CONFIG_NAME, WEIGHTS_NAME, PROVENANCE_NAME):
            f = folder / name
            try:
                outside = (f.exists() or f.is_symlink()) and not f.resolve().is_relative_to(self.root)
            except (OSError, RuntimeError):  # a loop of links
                outside = True
            if outside:
                raise AdapterPathError(f"adapter file {f.relative_to(self.root)} resolves outside the adapters root")


class ResidentAdapters:
    """Adapters resident in `bank`, at most `max_loaded`, evicted least recently used first."""

    def __init__(self, bank: MultiAdapterModel, root: AdapterRoot, max_loaded: int,
                 source_hash: str | None = None) -> None:
        if max_loaded < 1:
            raise ValueError(f"max_loaded_adapters must be >= 1, got {max_loaded}")
        self.bank, self.root, self.max_loaded, self.source_hash = bank, root, max_loaded, source_hash
        self.lru: OrderedDict[str, Path] = OrderedDict()  # resident name -> folder, oldest first
        self.registered: dict[str, Path] = {}  # names given by load_lora_adapter -> folder
        self.evictions = 0

    @property
    def names(self) -> list[str]:
        return list(self.lru)

    def folder_of(self, name: str) -> Path:
        """Where `name` loads from: its registered path, else the folder `name` under the root."""
        if name in self.registered:
            return self.registered[name]
        return self.root.resolve(self.root.check_name(name))

    def known(self, name: str) -> bool:
        """Resident, registered, or a folder under the root (AdapterPathError for unsafe names)."""
        return name in self.lru or name in self.registered or self.root.exists(self.folder_of(name))

    def can_load(self, name: str, pinned: Collection[str]) -> bool:
        return name in self.lru or len(self.lru) < self.max_loaded or any(n not in pinned for n in self.lru)

    def ensure(self, name: str, pinned: Collection[str] = ()) -> int:
        """The slot of `name`, loading it (and evicting an unpinned LRU adapter) if needed."""
        if name in self.lru:
            self.lru.move_to_end(name)
            return self.bank.adapter_index(name)
        return self._load(name, self.folder_of(name), pinned)

    def load(self, name: str, path: str, pinned: Collection[str] = ()) -> int:
        """load_lora_adapter: register `name` -> `path` (inside the root) and make it resident."""
        self.root.check_name(name)
        folder = self.root.resolve(path)
        if name in self.lru:
            if self.lru[name] == folder:
                self.lru.move_to_end(name)
                return self.bank.adapter_index(name)
            raise ValueError(f"adapter {name!r} is already loaded from another path: unload it first")
        slot = self._load(name, folder, pinned)
        self.registered[name] = folder
        return slot

    def unload(self, name: str, pinned: Collection[str] = ()) -> None:
        if name not in self.lru and name not in self.registered:
            raise KeyError(f"adapter {name!r} is not loaded")
        if name in pinned:
            raise AdapterBusyError(f"adapter {name!r} serves running or waiting requests")
        if name in self.lru:
            self.bank.remove_adapter(name)
            del self.lru[name]
        self.registered.pop(name, None)

    def _load(self, name: str, folder: Path, pinned: Collection[str]) -> int:
        if not self.root.exists(folder):
            raise AdapterLoadError(f"adapter {name!r} cannot be loaded: no {CONFIG_NAME} in its folder")
        self.root.check_files(folder)
        while len(self.lru) >= self.max_loaded:
            victim = next((n for n in self.lru if n not in pinned), None)
            if victim is None:
                raise AdapterBusyError(f"all {self.max_loaded} adapter slots serve running requests")
            self.bank.remove_adapter(victim)
            del self.lru[victim]
            self.evictions += 1
        try:  # add_adapter checks everything (config, provenance, keys, shapes, finite values) before the model changes
            slot = self.bank.add_adapter(name, folder, expected_source_hash=self.source_hash)
        except Exception as e:  # noqa: BLE001 -- a broken file may raise anything (SafetensorError, TypeError, ...)
            why = public_message(str(e) or type(e).__name__, folder, self.root.root)
            if "safetensor" in type(e).__name__.lower():  # the reader's own words do not name the file
                why = f"{WEIGHTS_NAME} is truncated or not a safetensors file ({why})"
            raise AdapterLoadError(f"adapter {name!r} cannot be loaded: {why}") from None
        self.lru[name] = folder
        return slot
