"""Process-level runtime settings restora's commands apply at start-up.

Return freed memory to the OS. With glibc's default dynamic mmap threshold, the large
activation buffers a training step frees stay in the heap, so peak RSS keeps growing step
after step (measured: 22–53% above the live tensors; benchmarks/plan_accuracy.py). Setting
M_MMAP_THRESHOLD to 128 KiB makes every large tensor its own mapping, released on free,
so RSS tracks live memory and the memory planner's estimates hold (within 2.1%).

The price is speed where many large tensors come and go: training SmolLM2 ran at 133
instead of 226 tokens/s (1 thread, benchmarks/train_step.py), with peak RSS 2.8 instead of
4.4 GiB. So the commands whose peak is a promise and which do not train (`serve`, `quantize`, `restore`,
`export`: restora.cli.RELEASE_BY_DEFAULT) apply it, and so does `restora train` for models of 1B+ parameters
(restora.train.recipe: there memory is what limits a run, and the planner's figure is what a user plans by; an
eager 1B NF4 step peaked at 3.78 GiB under glibc's default against 2.78 with it, planned 2.99). Other commands
apply it only with RESTORA_MALLOC=release; RESTORA_MALLOC=default turns it off everywhere.
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["available_memory", "release_freed_memory"]

M_MMAP_THRESHOLD = -3
THRESHOLD = 128 * 1024


def release_freed_memory(default: bool = False) -> bool:
    """Apply the mmap threshold on glibc (Linux) if asked (or `default`); returns whether applied."""
    choice = os.environ.get("RESTORA_MALLOC")
    if choice == "default" or (choice != "release" and not default) or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        threshold = int(os.environ.get("RESTORA_MMAP_THRESHOLD", THRESHOLD))
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo (Linux): what a new allocation can take without swapping; None elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
