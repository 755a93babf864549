"""restora's native kernels: C sources built on first use with the system C compiler, loaded with ctypes.

A kernel (restora.kernels.int4, restora.kernels.attention_decode) names its C source, compiler flags and the
CPU flags it needs; `load` returns the library, or None when the kernel cannot run here, and the caller
then takes torch's path. None when any of these holds:
- RESTORA_NATIVE=0;
- not x86-64 Linux, or /proc/cpuinfo lacks one of the CPU flags;
- no C compiler ($CC, cc, gcc or clang: inductor needs one too);
- the build fails or takes longer than $RESTORA_NATIVE_TIMEOUT seconds (default 600; one warning naming the
  kernel).

The kernels' torch operators (restora::int4_amx_mm, restora::attention_decode) get C++ kernels from
native_ops.cpp, built the same way with the C++ compiler ($CXX if set, else c++, g++ or clang++) against the
installed torch's headers, so the dispatcher calls them without a round trip into Python (3.8 against 9-10 us a
call, measured). Where that cannot be built the operators get Python kernels calling the C kernels through
ctypes: the same results, more overhead a call.

Builds go to $RESTORA_CACHE/kernels (default ~/.cache/restora/kernels, beside restora's converted models),
named by a hash of the source, compiler and flags, written to a temp file and renamed into place, so a
half-written library is never loaded and each source is built once per user. That folder must be this user's
and private (0700: made so when it is ours); another user's folder (a shared RESTORA_CACHE) is never loaded
from: the build goes to a private temporary folder instead, with one warning. Each build records the
library's sha256 beside it (NAME.so.sha256); a library whose file, record or owner does not match is
rebuilt, never loaded.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import signal
import stat
import subprocess
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from restora.core.atomic import fsync_file, locked
from restora.core.cache import cache_dir as restora_cache

__all__ = ["bind", "build", "build_dir", "cache_dir", "call", "compiler", "cpu_flags", "load", "cpp_kernels", "serve"]

OPS_SOURCE = Path(__file__).with_name("native_ops.cpp")


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
    """kernels/ in restora's cache, beside the converted models (restora.core.cache)."""
    return restora_cache() / "kernels"


BUILD_TIMEOUT = 600.0  # seconds a compiler call may take ($RESTORA_NATIVE_TIMEOUT), then torch's path is taken
_fallback: list[Path] = []


def _private(folder: Path) -> bool:
    """`folder` is a real folder owned by this user that no one else may write to (made 0700 when it is ours)."""
    st = folder.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        return False
    if st.st_mode & 0o077:
        os.chmod(folder, 0o700)
    return True


def build_dir() -> Path:
    """Where this user's libraries are built and loaded from: cache_dir() if it is private (owned by this user,
    0700; created so), else (another user's or a link: code planted there must not be loaded) a private
    temporary folder for this process, with one warning."""
    folder = cache_dir()
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        folder.mkdir(mode=0o700, exist_ok=True)
        if _private(folder):
            return folder
    except OSError:
        pass
    if not _fallback:
        _fallback.append(Path(tempfile.mkdtemp(prefix="restora-kernels-")))  # 0700, this user's
        warnings.warn(f"restora: {folder} is not a folder owned by this user (or cannot be made private); "
                      f"building native kernels in {_fallback[0]} instead", stacklevel=3)
    return _fallback[0]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _trusted(target: Path) -> bool:
    """`target` and its recorded hash (TARGET.sha256, written by the build) are this user's and agree."""
    record = target.with_name(target.name + ".sha256")
    try:
        if any(p.lstat().st_uid != os.geteuid() or not stat.S_ISREG(p.lstat().st_mode) for p in (target, record)):
            return False
        return record.read_text().strip() == _sha256(target)
    except OSError:
        return False


def _allowed() -> bool:
    """RESTORA_NATIVE is not 0 and this is x86-64 Linux: the only place the kernels are built for."""
    return (os.environ.get("RESTORA_NATIVE", "1") != "0" and platform.system() == "Linux"
            and platform.machine() in ("x86_64", "AMD64"))


def compiler() -> str | None:
    return next((c for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)), None)


def build(source: Path, flags: list[str], cc: str, tail: list[str] | None = None) -> Path:
    """The shared library for this source and these flags (`tail`: after the source, e.g. libraries to link),
    compiled once per user into build_dir(), its sha256 recorded beside it and checked before it is used again
    (a library that does not match is rebuilt). The compiler gets $RESTORA_NATIVE_TIMEOUT seconds
    (subprocess.TimeoutExpired past that)."""
    tail = tail or []
    digest = hashlib.sha256(source.read_bytes() + " ".join([cc, *flags, *tail]).encode()).hexdigest()[:16]
    folder = build_dir()
    target = folder / f"{source.stem}-{digest}.so"
    if _trusted(target):
        return target
    timeout = float(os.environ.get("RESTORA_NATIVE_TIMEOUT", BUILD_TIMEOUT))
    with locked(folder):  # one build of a library at a time; a waiting process then finds it built
        if _trusted(target):
            return target
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
        os.close(fd)
        record = target.with_name(target.name + ".sha256")
        try:
            _compile([cc, *flags, str(source), *tail, "-o", tmp], timeout)
            fsync_file(tmp)
            os.chmod(tmp, 0o700)
            record.unlink(missing_ok=True)  # no window where an old record vouches for a new library
            os.replace(tmp, target)
            record_tmp = Path(tmp + ".sha256")
            record_tmp.write_text(_sha256(target) + "\n")
            os.replace(record_tmp, record)
        finally:
            for leftover in (tmp, tmp + ".sha256"):
                if os.path.exists(leftover):
                    os.unlink(leftover)
    return target


def _compile(cmd: list[str], timeout: float) -> None:
    """Run the compiler; past `timeout` its whole process group (the driver and cc1/ld under it) is killed."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd, out, err)


def _failure(e: BaseException) -> str:
    if isinstance(e, subprocess.TimeoutExpired):
        return f"the compiler took over {e.timeout:g} s"
    detail = getattr(e, "stderr", "") or str(e)
    return str(detail).strip()[:200]


def load(source: Path, flags: list[str], needs: Iterable[str], what: str) -> ctypes.CDLL | None:
    """`source` built with `flags` and loaded, or None where it cannot run (module docstring); `what` names
    the kernel in the warning a failed build gives."""
    if not _allowed() or not set(needs) <= cpu_flags():
        return None
    cc = compiler()
    if cc is None:
        return None
    try:
        return ctypes.CDLL(str(build(source, flags, cc)))
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        warnings.warn(f"restora: {what} did not build ({_failure(e)}); using torch's kernel", stacklevel=3)
        return None


# The operators' C++ kernels (native_ops.cpp): built against this torch, registered for the CPU when loaded.
# Each kernel module hands `serve` its operator's Python kernel, which is registered instead where the C++
# ones cannot be built (no C++ compiler or torch headers), so every operator always has exactly one kernel.
_python_served: set[str] = set()


@functools.cache
def _ops_library() -> ctypes.CDLL | None:
    if not _allowed():
        return None
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++", "clang++"]  # $CXX: only it
    cxx = next((c for c in candidates if shutil.which(c)), None)
    torch_dir = Path(torch.__file__).parent
    if cxx is None or not (torch_dir / "include" / "torch" / "library.h").exists():
        return None
    flags = ["-O2", "-shared", "-fPIC", "-std=c++17", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
             f"-I{torch_dir / 'include'}", f"-I{torch_dir / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
             f"-DRESTORA_TORCH={torch.__version__}"]
    libs = [f"-L{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_dir / 'lib'}"]
    try:
        path = build(OPS_SOURCE, flags, cxx, libs)
        torch.ops.load_library(str(path))
        return ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        warnings.warn(f"restora: the native operators' C++ kernels did not build ({_failure(e)}); "
                      "calling the kernels through Python", stacklevel=3)
        return None


def serve(op: str, python_kernel: Any, entry: ctypes._CFuncPtr) -> None:
    """Give operator `op` (e.g. "restora::int4_amx_mm") its CPU kernel: the C++ one, pointed at the C kernel's
    `entry`, where native_ops.cpp builds; `python_kernel` otherwise."""
    ops = _ops_library()
    if ops is not None:
        ops.restora_native_set.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
        if ops.restora_native_set(op.split("::")[1].encode(), ctypes.cast(entry, ctypes.c_void_p)) != 0:
            raise ValueError(f"{op}: native_ops.cpp has no kernel for this operator")
    elif op not in _python_served:
        torch.library.impl(op, "CPU")(python_kernel)
        _python_served.add(op)


def bind(lib: ctypes.CDLL, entry: str, argtypes: list[Any], op: str, python_kernel: Any) -> None:
    """Declare C function `entry` of `lib` (returning int) and make it operator `op`'s kernel (`serve`)."""
    function = getattr(lib, entry)
    function.argtypes, function.restype = argtypes, ctypes.c_int
    serve(op, python_kernel, function)


def cpp_kernels() -> bool:
    """The operators run their C++ kernels (eager callers then go through the dispatcher, ~1.5 us a call)."""
    return _ops_library() is not None


def call(op: Any, python_kernel: Any, *args: Any) -> Any:
    """Operator `op` (e.g. torch.ops.restora.int4_amx_mm) on `args`: through the dispatcher inside a compiled graph
    (the graph needs the op; its fake gives the shape) or where the C++ kernels run; eager with only the Python
    kernel, that kernel directly, without the dispatcher's round trip into Python (int4 `linear` on a 16 x 64
    layer: 13 -> 10 us a call, measured; the ctypes call alone is 2.6)."""
    if torch.compiler.is_compiling() or cpp_kernels():
        return op(*args)
    return python_kernel(*args)
