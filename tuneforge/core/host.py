"""How this process takes memory from the operating system: asked for once, before torch's first
large allocation (the command line does it first thing; ``io.load.load_model`` too, for library use).

On a CPU every training step frees its activations and allocates them again. Most are larger than
glibc's mmap threshold, so each came back as fresh pages from the kernel, zero-filled with a fault per
4 KiB: on the default model's 4 x 256 LoRA step, about 250,000 faults (1 GB) and 0.9 s of system time
a step. Two settings keep those pages:

- blocks of 2 MiB and more come in huge pages where the kernel lends them on request (transparent huge
  pages in madvise mode): torch's allocator asks for them when ``THP_MEM_ALLOC_ENABLE`` is set, which it
  reads once, at its first large allocation;
- glibc keeps what is freed for the next step instead of returning it (its mmap and trim thresholds
  raised), so that a step reuses the pages of the one before.

A user's own ``THP_MEM_ALLOC_ENABLE`` (0 turns huge pages off) is left as it is. Elsewhere than
Linux with glibc, only the variable is set.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
_KEEP = 1 << 30  # blocks up to 1 GiB come from the heap, and up to 1 GiB of free heap stays with the process

_kept: bool | None = None  # what the first call found


def keep_freed_memory() -> bool:
    """Set up this process's host memory as the module says (once); True where glibc took the thresholds."""
    global _kept
    if _kept is None:
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
        _kept = _raise_glibc_thresholds()
    return _kept


def _raise_glibc_thresholds() -> bool:
    try:
        if sys.platform != "linux" or not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return False
        libc = ctypes.CDLL("libc.so.6")
    except (OSError, ValueError, AttributeError):  # no such name on this system, or no glibc
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _KEEP)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _KEEP))
