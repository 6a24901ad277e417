"""The output directory of a run: one run at a time (a lock), never silently reused, files with the user's umask.

A directory that already holds a run (metrics, checkpoints or a final model) is refused unless the new run
continues it (``--resume``) or replaces it (``--overwrite``); nothing in it is touched before that is decided.
The lock file holds the owner's pid and host; a lock whose process is gone (same host) is stale and taken over.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from dpokit.errors import ConfigError

LOCK = ".dpokit.lock"
RUN_FILES = ("metrics.jsonl", "final")  # besides checkpoint-* directories and TensorBoard events


def run_contents(output: Path) -> list[str]:
    """What of an earlier run `output` holds (names, sorted); empty for a new or unrelated directory."""
    if not output.is_dir():
        return []
    found = [p.name for p in output.iterdir()
             if p.name in RUN_FILES or p.name.startswith("checkpoint-") or p.name.startswith("events.out.tfevents")]
    return sorted(found)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _take_lock(path: Path) -> None:
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
    for _ in range(2):
        try:
            handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            try:
                owner = json.loads(path.read_text())
            except (OSError, ValueError):
                owner = {}
            same_host = owner.get("host") == socket.gethostname()
            if same_host and isinstance(owner.get("pid"), int) and not _alive(owner["pid"]):
                print(f"{path.parent}: removing the stale lock of process {owner['pid']}, which is gone")
                path.unlink(missing_ok=True)
                continue
            since = time.strftime("%Y-%m-%d %H:%M", time.localtime(owner.get("started", 0)))
            raise ConfigError(f"{path.parent} is in use by another run (pid {owner.get('pid', '?')} on "
                              f"{owner.get('host', '?')} since {since}); wait for it, or choose another --output"
                              + ("" if same_host else f" (delete {path} if that run is gone)")) from None
        with os.fdopen(handle, "w") as file:
            file.write(record)
        return
    raise ConfigError(f"cannot take the lock {path}")


def _refuse_reuse(output: Path, resume: bool, overwrite: bool, contents: Callable[[Path], list[str]],
                  resumable: bool = True) -> None:
    existing = contents(output)
    if existing and not (resume or overwrite):
        raise ConfigError(f"{output} already holds a run ({', '.join(existing[:4])}"
                          f"{', ...' if len(existing) > 4 else ''}); pass "
                          f"{'--resume to continue it, ' if resumable else ''}--overwrite to replace it, or choose "
                          "another --output")


@contextlib.contextmanager
def claim_output(output: str | Path, *, resume: bool, overwrite: bool, main_process: bool = True,
                 contents: Callable[[Path], list[str]] = run_contents, resumable: bool = True) -> Iterator[None]:
    """Hold `output` for this run: refuse a directory in use or holding another run, clear it with `overwrite`.

    Only the main process checks and locks; the others wait for its decision at their first collective.
    `contents` lists what of an earlier run a directory holds (default: a training run's, :func:`run_contents`);
    `resumable` False: the command has no --resume (the refusal does not suggest it).
    """
    output = Path(output)
    if not main_process:
        yield
        return
    if resume and overwrite:
        raise ConfigError("--resume continues the run in --output and --overwrite replaces it: give one")
    _refuse_reuse(output, resume, overwrite, contents, resumable)  # before anything is written there
    created = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    lock = output / LOCK
    _take_lock(lock)
    try:
        _refuse_reuse(output, resume, overwrite, contents, resumable)  # again, now that no other run can start writing
        existing = contents(output)
        if existing and overwrite:
            for name in existing:
                target = output / name
                shutil.rmtree(target) if target.is_dir() else target.unlink()
        yield
    finally:
        lock.unlink(missing_ok=True)
        if created and not any(output.iterdir()):  # a run that stopped before writing leaves nothing behind
            output.rmdir()


def apply_umask(path: str | Path) -> None:
    """Give `path` (a file, or a directory and everything in it) the modes the user's umask asks for.

    Temporary-file helpers create files 0600; what dpokit leaves behind should be readable like anything
    else the user writes."""
    mask = os.umask(0)
    os.umask(mask)
    path = Path(path)
    items = [path] + (list(path.rglob("*")) if path.is_dir() else [])
    for item in items:
        os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


def disk_full(error: Exception) -> bool:
    """An OSError, or safetensors' own error wrapping one (it reports "os error 28"), for a full device."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return True
    text = str(error)
    return f"os error {errno.ENOSPC}" in text or "No space left" in text


def tree_bytes(path: str | Path) -> int:
    """The bytes of the files under `path`."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def tensor_bytes(values) -> int:
    """The bytes of the tensors among `values` (what has numel and element_size; anything else counts 0)."""
    return sum(v.numel() * v.element_size() for v in values if hasattr(v, "element_size"))


def no_space_message(target: Path, needed: int, how: str) -> str:
    """The one-line error of a write of `target` (a directory written under a temporary name, which is gone
    again) that found its device full: the bytes it needs (estimated `how`) and those free."""
    try:
        free = f"{shutil.disk_usage(target.parent).free:,} bytes free there"
    except OSError:
        free = "free space unknown"
    return (f"{target}: no space left on the device: about {needed:,} bytes needed ({how}), {free}; nothing of "
            "it was kept and earlier checkpoints are intact: free some space and --resume")
