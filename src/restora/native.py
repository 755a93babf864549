"""restora's native kernels: C sources built on first use with the system C compiler, loaded with ctypes.

A kernel (restora.quant.int4_kernel, restora.attention_kernel) names its C source, compiler flags and the
CPU flags it needs; `load` returns the library, or None when the kernel cannot run here, and the caller
then takes torch's path. None when any of these holds:
- RESTORA_NATIVE=0;
- not x86-64 Linux, or /proc/cpuinfo lacks one of the CPU flags;
- no C compiler ($CC, cc, gcc or clang: inductor needs one too);
- the build fails (one warning naming the kernel).

Builds go to $RESTORA_CACHE/kernels (default ~/.cache/restora/kernels, beside restora's converted models),
named by a hash of the source, compiler and flags, written to a temp file and renamed into place, so a
half-written library is never loaded and each source is built once per user.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path

__all__ = ["build", "cache_dir", "compiler", "cpu_flags", "load"]


def cpu_flags() -> set[str]:
    """The flags line of /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cache_dir() -> Path:
    return Path(os.environ.get("RESTORA_CACHE", Path.home() / ".cache" / "restora")) / "kernels"


def compiler() -> str | None:
    return next((c for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)), None)


def build(source: Path, flags: list[str], cc: str) -> Path:
    """The shared library for this source and these flags, compiled once per user (atomic rename)."""
    digest = hashlib.sha256(source.read_bytes() + " ".join([cc, *flags]).encode()).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *flags, str(source), "-o", tmp], check=True, capture_output=True, text=True)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load(source: Path, flags: list[str], needs: Iterable[str], what: str) -> ctypes.CDLL | None:
    """`source` built with `flags` and loaded, or None where it cannot run (module docstring); `what` names
    the kernel in the warning a failed build gives."""
    if os.environ.get("RESTORA_NATIVE", "1") == "0":
        return None
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    if not set(needs) <= cpu_flags():
        return None
    cc = compiler()
    if cc is None:
        return None
    try:
        return ctypes.CDLL(str(build(source, flags, cc)))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        warnings.warn(f"restora: {what} did not build ({detail.strip()[:200]}); using torch's kernel", stacklevel=3)
        return None
