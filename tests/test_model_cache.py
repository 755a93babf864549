"""restora's converted-model cache is keyed by file content, so reinstalling a package does not convert again."""

import hashlib
import os

from restora.models import load


def test_gguf_conversion_is_found_by_content_not_path_or_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("RESTORA_CACHE", str(tmp_path / "cache"))
    body = os.urandom(1 << 16)
    first = tmp_path / "site-a" / "m.gguf"
    first.parent.mkdir()
    first.write_bytes(body)
    digest = hashlib.sha256(body).hexdigest()
    assert load._file_sha256(first) == digest
    done = tmp_path / "cache" / "models" / f"m-{digest[:16]}"  # a finished conversion of these bytes
    done.mkdir(parents=True)
    (done / "config.json").write_text("{}")
    (done / load.HASH_FILE).write_text("x\n")
    again = tmp_path / "site-b" / "m.gguf"  # the same package installed elsewhere, later
    again.parent.mkdir()
    again.write_bytes(body)
    os.utime(again, ns=(1, 1))
    assert load._convert_gguf(again, "m") == done  # no conversion: the gguf package is never needed

    other = tmp_path / "site-c" / "m.gguf"
    other.parent.mkdir()
    other.write_bytes(body[:-1] + bytes([body[-1] ^ 1]))
    assert load._file_sha256(other) != digest


def test_file_hash_is_remembered_until_the_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("RESTORA_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    os.utime(f, ns=(10**18, 10**18))
    assert load._file_sha256(f) == hashlib.sha256(b"abc").hexdigest()
    f.write_bytes(b"xyz")  # same path, size and mtime: the remembered hash is used, the file is not read
    os.utime(f, ns=(10**18, 10**18))
    assert load._file_sha256(f) == hashlib.sha256(b"abc").hexdigest()
    os.utime(f, ns=(2 * 10**18, 2 * 10**18))  # touched: read again
    assert load._file_sha256(f) == hashlib.sha256(b"xyz").hexdigest()


def test_a_folder_converted_under_the_older_name_is_renamed_not_converted_again(tmp_path, monkeypatch):
    monkeypatch.setenv("RESTORA_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"gguf bytes")
    st = f.stat()
    older = tmp_path / "cache" / "models" / f"m-{st.st_size}-{int(st.st_mtime)}"
    older.mkdir(parents=True)
    (older / "config.json").write_text("{}")
    (older / load.HASH_FILE).write_text("x\n")
    got = load._convert_gguf(f, "m")
    assert got.name == f"m-{hashlib.sha256(b'gguf bytes').hexdigest()[:16]}" and (got / "config.json").is_file()
    assert not older.exists()
