"""The safetensors file format, read and written one tensor at a time with plain file I/O.

    [8 bytes: header length N, little-endian u64][N bytes: JSON header][tensor data]
    header: {"__metadata__": {str: str}, name: {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}}

safetensors' own `save_file` serialises every tensor to bytes before writing (a second copy of the model in
memory), and reading through its memory map leaves each shard's pages in the process's resident set until the
shard is unmapped. Here a writer streams each tensor's bytes straight from the tensor, and a reader fills each new
tensor with one positioned read, so neither holds more than the tensors themselves. Files are interchangeable
with safetensors' (little-endian data, header padded with spaces to 8 bytes, offsets relative to the data).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

__all__ = ["DTYPES", "read_header", "read_tensor", "write_file"]

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_NAMES = {v: k for k, v in DTYPES.items()}
Entry = tuple[torch.dtype, tuple[int, ...], int, int]  # dtype, shape, absolute start, absolute end


def read_header(path: Path) -> dict[str, Entry]:
    """{name: (dtype, shape, start, end)} of a safetensors file, checked against the file's size."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            if n > min(size - 8, 100_000_000):
                raise ValueError(f"header length {n} exceeds the file")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}); it may be truncated") from None
    out: dict[str, Entry] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (8 + n + int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: header entry {name} is malformed ({e})") from None
        if end > size:
            raise ValueError(f"{path} is not a readable safetensors file (tensor {name} ends past the end of the "
                             f"file); it may be truncated")
        numel = 1
        for s in shape:
            numel *= s
        if end - begin != numel * dtype.itemsize:
            raise ValueError(f"{path}: tensor {name} holds {end - begin} bytes; shape {list(shape)} and dtype "
                             f"{entry['dtype']} need {numel * dtype.itemsize}")
        out[name] = (dtype, shape, begin, end)
    return out


def read_tensor(path: Path, entry: Entry, name: str = "tensor") -> torch.Tensor:
    """One tensor of a safetensors file, in new memory of its own."""
    dtype, shape, start, end = entry
    out = torch.empty(end - start, dtype=torch.uint8)
    with open(path, "rb") as f:
        f.seek(start)
        got = f.readinto(memoryview(out.numpy())) if end > start else 0
    if got != end - start:
        raise ValueError(f"{path}: {name} ends past the end of the file; it may be truncated")
    return out.view(dtype).reshape(shape)


def write_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (CPU, any layout) as a safetensors file, one tensor's bytes at a time."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _NAMES:
            raise ValueError(f"{name}: dtype {t.dtype} cannot be stored in safetensors")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors.values():
            t = t.detach().cpu().contiguous()
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
