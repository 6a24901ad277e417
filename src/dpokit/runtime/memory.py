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

That is why the `dpokit` command (all but `dpokit demo`, whose tiny model does not gain) runs itself on such an
allocator by default (`reexec_with_malloc`): mimalloc, which the `cmeel-mimalloc` wheel ships on Linux, else a
system jemalloc. The process re-executes itself with the library in ``LD_PRELOAD`` before torch is imported, as
PyTorch's own CPU launcher (``torch.backends.xeon.run_cpu``) does. ``DPOKIT_MALLOC`` chooses: ``auto`` (the default), ``mimalloc``, ``jemalloc``, a library file, or ``system``
(the C library's malloc, as before). Freed pages are kept for reuse (``MIMALLOC_PURGE_DELAY=-1``; jemalloc: the
launcher's ``MALLOC_CONF``), unless the user set those variables. Measured (bench/README.md, "Scale"): the LoRA
step of bench_scale.py at 0.55-0.65x glibc's peak memory, and 0.9x its step time.

The command also caps oneDNN's kernel cache (`cap_onednn_cache`), which otherwise grows through a bfloat16 run on a
CPU by one entry per matmul shape.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import os
import platform
import sys
from collections.abc import Mapping, MutableMapping
from pathlib import Path

from dpokit.errors import DpokitError

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's initial DEFAULT_MMAP_THRESHOLD_MIN, kept from rising
ENV_OVERRIDE = "MALLOC_MMAP_THRESHOLD_"

MALLOC_CHOICE = "DPOKIT_MALLOC"  # auto | mimalloc | jemalloc | system | a library file
PRELOADED = "DPOKIT_MALLOC_PRELOADED"  # set in the re-executed process: the library it preloaded
ALLOCATOR_NAMES = ("mimalloc", "jemalloc", "tcmalloc")
# PyTorch's CPU launcher's jemalloc settings, with freed pages kept for reuse instead of decayed (bench/README.md)
JEMALLOC_CONF = "background_thread:true,metadata_thp:auto,dirty_decay_ms:-1,muzzy_decay_ms:-1"
# mimalloc the same way: freed pages stay for reuse rather than being returned and faulted in again (~10% faster
# steps at bench_scale.py's LoRA shape, bench/README.md)
MIMALLOC_SETTINGS = {"MIMALLOC_PURGE_DELAY": "-1"}


# oneDNN, which runs torch's bfloat16 and float16 matmuls on a CPU, caches up to 1,024 compiled kernels by default,
# one per matmul shape, and each holds memory. Training on pairs of varied lengths brings new shapes every step,
# so that cache grows through a run; a step's own shapes (a few dozen) fit in this many.
ONEDNN_CACHE = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
ONEDNN_CACHE_ENTRIES = 64


def return_freed_blocks(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Make glibc serve every block of at least `threshold` bytes by mmap from now on, in this process.

    Returns whether the setting was applied: False on a C library other than glibc, when another allocator is
    preloaded, when the user set ``MALLOC_MMAP_THRESHOLD_``, or when glibc refused it.
    """
    if os.environ.get(ENV_OVERRIDE) is not None:
        return False
    libc = _glibc_serving_malloc()
    return libc is not None and bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))


def _glibc_serving_malloc() -> ctypes.CDLL | None:
    """glibc, when its `malloc` is the process's: None on another C library or when a preloaded allocator (e.g.
    jemalloc) interposes its own."""
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None

    def address(function) -> int | None:
        return ctypes.cast(function, ctypes.c_void_p).value

    return libc if address(ctypes.CDLL(None).malloc) == address(libc.malloc) else None


def find_malloc(choice: str) -> Path | None:
    """The library file of allocator `choice` ("mimalloc", "jemalloc", "auto": the first of those found, or a
    path); None when "auto" finds none. An allocator asked for by name or path that is not there is an error."""
    if choice not in ("auto", "mimalloc", "jemalloc"):
        path = Path(choice)
        if not path.is_file():
            raise DpokitError(f"{MALLOC_CHOICE}={choice}: no such library file (auto, mimalloc, jemalloc, system "
                              "or the path of a malloc library)")
        return path.resolve()
    for name in ("mimalloc", "jemalloc") if choice == "auto" else (choice,):
        found = _mimalloc_from_wheel() if name == "mimalloc" else _system_library("jemalloc")
        if found is not None:
            return found
    if choice == "auto":
        return None
    hint = ("pip install cmeel-mimalloc" if choice == "mimalloc"
            else "install libjemalloc2 (Debian/Ubuntu) or jemalloc, or give the library's path")
    raise DpokitError(f"{MALLOC_CHOICE}={choice}: not found ({hint})")


def malloc_environment(environ: Mapping[str, str]) -> dict[str, str] | None:
    """The environment in which to run this process again so that torch allocates through the allocator that
    ``DPOKIT_MALLOC`` chooses (default: auto); None when there is nothing to do: not Linux, ``system`` chosen,
    already re-executed, an allocator already preloaded by the user, or none found."""
    choice = environ.get(MALLOC_CHOICE, "auto").strip() or "auto"
    preloaded = environ.get("LD_PRELOAD", "")
    if (sys.platform != "linux" or choice == "system" or environ.get(PRELOADED)
            or any(name in preloaded for name in ALLOCATOR_NAMES)):
        return None
    library = find_malloc(choice)
    if library is None:
        return None
    environment = dict(environ)
    environment["LD_PRELOAD"] = f"{library}:{preloaded}" if preloaded else str(library)
    environment[PRELOADED] = str(library)
    if "jemalloc" in library.name and "MALLOC_CONF" not in environ:
        environment["MALLOC_CONF"] = JEMALLOC_CONF
    if "mimalloc" in library.name:
        environment.update({k: v for k, v in MIMALLOC_SETTINGS.items() if k not in environ})
    return environment


def reexec_with_malloc() -> None:
    """Replace this process by the same command on the allocator ``DPOKIT_MALLOC`` chooses, if that changes
    anything (`malloc_environment`). Call it before torch is imported: nothing done so far survives."""
    environment = malloc_environment(os.environ)
    if environment is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment)


def malloc_in_use() -> str:
    """A short name of the allocator serving this process's malloc: "glibc", a preloaded one, or "other"."""
    if _glibc_serving_malloc() is not None:
        return "glibc"
    preloaded = os.environ.get("LD_PRELOAD", "")
    return next((name for name in ALLOCATOR_NAMES if name in preloaded), "other")


def malloc_note() -> str:
    """One line for a run's log: the allocator in use, and how it was chosen."""
    name = malloc_in_use()
    if os.environ.get(PRELOADED):
        return f"malloc: {name}, chosen by dpokit for a lower peak memory ({MALLOC_CHOICE}=system: the C library's)"
    return f"malloc: {name}"


def _mimalloc_from_wheel() -> Path | None:
    """libmimalloc from the cmeel-mimalloc wheel, when it is installed."""
    try:
        files = importlib.metadata.files("cmeel-mimalloc") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    libraries = sorted((f for f in files if f.name.startswith("libmimalloc.so")), key=lambda f: len(f.name))
    located = [Path(f.locate()) for f in libraries]
    return next((path for path in located if path.is_file()), None)


def _system_library(name: str) -> Path | None:
    found = ctypes.util.find_library(name)  # a soname such as libjemalloc.so.2, found by the dynamic linker
    if found is None:
        return None
    for directory in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
                      "/usr/local/lib"):
        if (Path(directory) / found).is_file():
            return Path(directory) / found
    return Path(found)  # LD_PRELOAD takes a bare soname too, and searches for it as the linker does


def cap_onednn_cache(environ: MutableMapping[str, str] | None = None) -> bool:
    """Limit oneDNN's kernel cache to ONEDNN_CACHE_ENTRIES entries, unless the user set
    ``ONEDNN_PRIMITIVE_CACHE_CAPACITY``; returns whether it was set here. oneDNN reads the variable once, when the
    process first runs one of its kernels, so this acts only if nothing has run a bfloat16 or float16 matmul on the
    CPU before. The `dpokit` command calls it first thing; a Python program that trains in bfloat16 on a CPU
    can call it (or set the variable) before its first bfloat16 matmul.

    Measured by `python bench/bench_onednn_cache.py` (bench/README.md): `dpokit dpo --dtype bfloat16`, 30 steps at
    the chat shape on 2 threads, peaked at 1,358 MiB instead of 1,636 in full fine-tuning and at 1,185 instead of
    1,432 with LoRA r16, at the same seconds per step."""
    environ = os.environ if environ is None else environ
    if environ.get(ONEDNN_CACHE, "").strip():
        return False
    environ[ONEDNN_CACHE] = str(ONEDNN_CACHE_ENTRIES)
    return True
