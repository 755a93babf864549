"""Process-level runtime settings restora's commands apply at start-up.

Return freed memory to the OS. With glibc's default dynamic mmap threshold, the large
activation buffers a training step frees stay in the heap, so peak RSS keeps growing step
after step (measured: 22–53% above the live tensors; benchmarks/plan_accuracy.py). Setting
M_MMAP_THRESHOLD to 128 KiB makes every large tensor its own mapping, released on free,
so RSS tracks live memory and the memory planner's estimates hold (within 2.1%).
Opt out with RESTORA_MALLOC=default.
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["release_freed_memory"]

M_MMAP_THRESHOLD = -3
THRESHOLD = 128 * 1024


def release_freed_memory() -> bool:
    """Apply the mmap threshold on glibc (Linux); returns whether it was applied."""
    if os.environ.get("RESTORA_MALLOC") == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD))
    except (OSError, AttributeError):
        return False
