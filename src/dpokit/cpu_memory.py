"""Freed activations go back to the operating system during CPU training (glibc malloc).

torch's CPU tensors come from malloc. glibc serves a large block with its own mmap, which free() returns to the
system, but only until the first such block is freed: then it raises its mmap threshold to that block's size
(up to 32 MiB), and from there on blocks of activation size are carved out of its heap, where a freed block stays
resident and can only be reused by a later block that fits into it. A training step allocates and frees
thousands of activation-sized tensors of changing shapes, so the heap keeps growing past what the step holds:
at bench_scale.py's shape (104.6M-parameter Llama, LoRA r=16, one thread) a forward pass saved ~510 MiB of
activations but grew the process by 756 MiB, none of which came back, and the peak RSS was 2,296 MiB (2,175-2,418);
with the threshold fixed at glibc's own starting value it was 1,418 MiB.

Fixing the threshold (``mallopt(M_MMAP_THRESHOLD, ...)``, which also stops glibc from adjusting it) keeps every
block of at least 128 KiB an mmap of its own, returned when freed. The price is a page fault for every page of
every such block, each time it is allocated: the same LoRA run took ~1.4x as long per step (0.76x the
throughput). So it is opt-in (``--return-freed-memory``), for runs that must fit in memory; bench/README.md
("Scale") has the measurements.
A threshold the user set through ``MALLOC_MMAP_THRESHOLD_`` is left alone, and so is any other C library or
allocator: with jemalloc preloaded (``LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2``, Debian/Ubuntu
package libjemalloc2) glibc's malloc is not the one torch calls, and jemalloc, which reuses freed blocks by size
class, already keeps the peak low without this setting's cost in step time (bench/README.md, "Scale").
"""

from __future__ import annotations

import ctypes
import os
import platform

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's initial DEFAULT_MMAP_THRESHOLD_MIN, kept from rising
ENV_OVERRIDE = "MALLOC_MMAP_THRESHOLD_"


def return_freed_blocks(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Make glibc serve every block of at least `threshold` bytes by mmap from now on, in this process.

    Returns whether the setting was applied: False on a C library other than glibc, when another allocator is
    preloaded, when the user set ``MALLOC_MMAP_THRESHOLD_``, or when glibc refused it.
    """
    if os.environ.get(ENV_OVERRIDE) is not None or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    if not _glibc_malloc_in_use(libc):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))


def _glibc_malloc_in_use(libc: ctypes.CDLL) -> bool:
    """Whether the process's `malloc` is glibc's, not one interposed by a preloaded allocator (e.g. jemalloc)."""
    def address(function) -> int | None:
        return ctypes.cast(function, ctypes.c_void_p).value

    return address(ctypes.CDLL(None).malloc) == address(libc.malloc)
