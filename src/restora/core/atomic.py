"""All-or-nothing folder writes: a reader sees the previous complete version or the new one, never a mix.

Two kinds of write, both under an exclusive lock (flock) on the folder that changes, so writers of one
place take turns and every temporary left there by someone else is a dead writer's:

- `atomic_dir(target)` replaces a whole folder. The new one is built in `.NAME.tmp*` beside it, every
  file and folder fsynced, then `target` is renamed to `.NAME.old`, the new one renamed to `target`,
  and `.NAME.old` removed. A kill between the two renames leaves only `.NAME.old`: `recover` (run by
  the next write and by readers) renames it back, so the previous version returns.
- `atomic_files(folder)` replaces some files inside a folder that holds others too (an adapter folder
  also holds checkpoint/ and metrics.jsonl). The new files are written to `FOLDER/.restora-stage*`,
  fsynced, and the stage is renamed to `FOLDER/.restora-pending`: that rename is the commit. The files
  are then moved out one by one. A kill before the commit leaves the old files; after it, `recover`
  finishes the moves, so the reader sees the new files.

A single file (a result, a record) is written by `write_text_atomic`: under the folder's lock, a temporary
`.NAME.tmp*` beside it, fsynced, renamed over it, the folder fsynced.

Leftover `.NAME.tmp*` and `.restora-stage*` temporaries are removed by the next write. For tests of
the above, RESTORA_TEST_KILL_AT=k makes the process SIGKILL itself at the k-th step of its writes.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: writes stay atomic, without the lock
    fcntl = None  # type: ignore[assignment]

__all__ = ["atomic_dir", "atomic_files", "recover", "fsync_file", "locked", "write_text_atomic", "KILL_AT_ENV", "PENDING"]

KILL_AT_ENV = "RESTORA_TEST_KILL_AT"
PENDING = ".restora-pending"
STAGE = ".restora-stage"

_steps = 0
_held: dict[tuple[int, int], int] = {}  # folders this process holds the lock of (re-entrant)


def _step() -> None:
    """One step of a write: with RESTORA_TEST_KILL_AT=k, the k-th step of this process kills it (tests)."""
    global _steps
    at = os.environ.get(KILL_AT_ENV)
    if at:
        _steps += 1
        if _steps == int(at):
            os.kill(os.getpid(), signal.SIGKILL)


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace one file's text all at once: a reader sees the old text or the new, even if the writer is killed.

    Under the folder's lock, the text goes to `.NAME.tmp*` beside the file (fsynced, with the file's mode, else
    the umask's), which is renamed over it; a dead writer's `.NAME.tmp*` is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path.parent):
        for stale in path.parent.glob(f".{path.name}.tmp*"):
            stale.unlink(missing_ok=True)
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask()
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp")
        try:
            with os.fdopen(fd, "w") as f:
                if hasattr(os, "fchmod"):  # POSIX
                    os.fchmod(f.fileno(), mode)
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_file(os.path.join(dirpath, name))
        _fsync_dir(Path(dirpath))


@contextmanager
def locked(folder: str | os.PathLike) -> Iterator[None]:
    """Exclusive flock on `folder` itself (released by the kernel if the process dies); re-entrant."""
    fd = os.open(folder, os.O_RDONLY)
    key = (os.fstat(fd).st_dev, os.fstat(fd).st_ino)
    if fcntl is None or key in _held:
        os.close(fd)
        _held[key] = _held.get(key, 0) + 1
        try:
            yield
        finally:
            _held[key] -= 1
            if not _held[key]:
                del _held[key]
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _held[key] = 1
        try:
            yield
        finally:
            del _held[key]
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _old(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def _recover_dir(target: Path, clear: bool) -> None:
    """Under the parent's lock: bring back `.NAME.old` if a swap stopped half-way; drop temporaries."""
    old = _old(target)
    if old.exists():
        if target.exists():  # the swap finished: .old is garbage
            shutil.rmtree(old)
        else:  # killed between the two renames: the previous version comes back
            os.replace(old, target)
        _fsync_dir(target.parent)
    if clear:
        for stale in target.parent.glob(f".{target.name}.tmp*"):
            shutil.rmtree(stale, ignore_errors=True)


def _roll_forward(folder: Path) -> None:
    """Move a committed stage's files into `folder` (some may be there already), then drop the stage."""
    pending = folder / PENDING
    for name in sorted(os.listdir(pending)):
        os.replace(pending / name, folder / name)
        _step()
    _fsync_dir(folder)
    os.rmdir(pending)
    _fsync_dir(folder)
    _step()


def _recover_files(folder: Path, clear: bool) -> None:
    if (folder / PENDING).is_dir():
        _roll_forward(folder)
    if clear:
        for stale in folder.glob(f"{STAGE}*"):
            shutil.rmtree(stale, ignore_errors=True)


def recover(path: str | os.PathLike) -> Path:
    """Finish or undo what a killed writer left at `path` (a folder written by atomic_dir or atomic_files);
    returns the folder to read. Cheap when there is nothing to do; readers call it before reading."""
    path = Path(path)
    old, pending = _old(path), path / PENDING
    if not old.exists() and not pending.exists():
        return path
    try:
        if old.exists() and path.parent.is_dir():
            with locked(path.parent):
                _recover_dir(path, clear=False)
        if pending.exists():
            with locked(path):
                _recover_files(path, clear=False)
    except PermissionError:
        if not path.exists() and old.is_dir():
            return old  # a read-only place: read the previous version where it lies
        raise RuntimeError(f"{path}: an interrupted write needs finishing and this user cannot write here") from None
    return path


@contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `target`; on success it replaces `target` (all or nothing)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with locked(target.parent):
        _recover_dir(target, clear=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp"))
        try:
            yield tmp
            _step()
            _fsync_tree(tmp)
            _step()
            old = _old(target)
            if target.exists():
                os.replace(target, old)
                _fsync_dir(target.parent)
                _step()
            os.replace(tmp, target)
            _fsync_dir(target.parent)
            _step()
            if old.exists():
                shutil.rmtree(old)
                _fsync_dir(target.parent)
                _step()
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_files(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty stage folder inside `folder`; on success its files replace (or join) `folder`'s files
    together: a reader after `recover` sees all of the old ones or all of the new ones. Plain files only."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with locked(folder):
        _recover_files(folder, clear=True)
        stage = Path(tempfile.mkdtemp(dir=folder, prefix=STAGE))
        try:
            yield stage
            _step()
            if any(p.is_dir() for p in stage.iterdir()):
                raise ValueError(f"{folder}: atomic_files writes plain files, not folders")
            _fsync_tree(stage)
            _step()
            os.replace(stage, folder / PENDING)  # the commit
            _fsync_dir(folder)
            _step()
            _roll_forward(folder)
        finally:
            if stage.exists():
                shutil.rmtree(stage, ignore_errors=True)
