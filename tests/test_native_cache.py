"""Native kernel builds: a private cache folder, a recorded sha256 checked before loading, a bounded compiler call."""

from __future__ import annotations

import ctypes
import hashlib
import os
import stat
import time
import warnings

import pytest

from restora.kernels import native

pytestmark = pytest.mark.skipif(native.compiler() is None, reason="no C compiler")

SOURCE = "int restora_answer(void) { return 42; }\n"
FLAGS = ["-O2", "-shared", "-fPIC"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RESTORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_fallback", [])
    src = tmp_path / "answer.c"
    src.write_text(SOURCE)
    return src


def _answer(path) -> int:
    return ctypes.CDLL(str(path)).restora_answer()


def test_build_is_private_and_records_its_hash(cache):
    path = native.build(cache, FLAGS, native.compiler())
    folder = native.cache_dir()
    assert path.parent == folder and stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert folder.stat().st_uid == os.geteuid()
    record = path.with_name(path.name + ".sha256")
    assert record.read_text().strip() == hashlib.sha256(path.read_bytes()).hexdigest()
    stamp = path.stat().st_mtime_ns
    assert native.build(cache, FLAGS, native.compiler()) == path and path.stat().st_mtime_ns == stamp  # built once
    assert _answer(path) == 42


def test_planted_library_is_rebuilt_not_loaded(cache):
    path = native.build(cache, FLAGS, native.compiler())
    good = path.read_bytes()
    planted = cache.with_name("planted.c")
    planted.write_text("int restora_answer(void) { return 666; }\n")
    other = native.build(planted, FLAGS, native.compiler())
    path.write_bytes(other.read_bytes())  # another library at the predictable name, its record left as it was
    again = native.build(cache, FLAGS, native.compiler())
    assert again == path and again.read_bytes() == good
    path.write_bytes(other.read_bytes())  # and with a record that vouches for it
    path.with_name(path.name + ".sha256").unlink()
    native.build(cache, FLAGS, native.compiler())
    assert path.read_bytes() == good


@pytest.mark.skipif(os.geteuid() != 0, reason="making a folder another user's needs root")
def test_folder_of_another_user_is_not_used(cache):
    folder = native.cache_dir()
    folder.mkdir(parents=True)
    os.chown(folder, 65534, 65534)  # nobody's: what a shared RESTORA_CACHE can hold
    with pytest.warns(UserWarning, match="is not a folder owned by this user"):
        path = native.build(cache, FLAGS, native.compiler())
    assert path.parent != folder and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert not any(folder.iterdir())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning a process
        assert native.build(cache, FLAGS, native.compiler()) == path
    assert _answer(path) == 42


def test_loose_mode_of_own_folder_is_made_private(cache):
    folder = native.cache_dir()
    folder.mkdir(parents=True)
    folder.chmod(0o777)
    native.build(cache, FLAGS, native.compiler())
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_slow_compiler_times_out_with_one_warning(cache, tmp_path, monkeypatch):
    slow = tmp_path / "slowcc"
    slow.write_text("#!/bin/sh\nsleep 30\ntrue\n")  # a child under the driver, as cc1 is
    slow.chmod(0o755)
    monkeypatch.setenv("CC", str(slow))
    monkeypatch.setenv("RESTORA_NATIVE_TIMEOUT", "0.5")
    monkeypatch.setattr(native, "_allowed", lambda: True)
    t0 = time.perf_counter()
    with pytest.warns(UserWarning, match=r"the answer kernel did not build \(the compiler took over 0.5 s\); "
                                         "using torch's kernel") as caught:
        assert native.load(cache, FLAGS, [], "the answer kernel") is None
    assert len(caught) == 1 and time.perf_counter() - t0 < 10
    assert not [p for p in native.cache_dir().iterdir() if p.suffix == ".so"]  # no half-built library left
