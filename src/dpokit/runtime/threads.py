"""How many intra-op threads torch uses for dpokit's work on the CPU.

torch's default is one intra-op thread per core. Every parallel kernel then ends at a barrier, and when another
busy process holds one of the cores, the thread the OS has descheduled holds up all the others: on 2 cores with
one busy neighbour, `dpokit demo` ran 35x slower than on a quiet machine. With one thread per process the OS
simply gives each busy process a core. dpokit therefore takes one thread per CPU that is free for it: the CPUs
the process may use (its affinity mask, capped by its cgroup CPU quota: v2 ``cpu.max``, v1
``cpu.cfs_quota_us``) less those other runnable processes occupy when the work starts, looked at again during
training. The model's width does not enter the rule: bench/bench_threads.py measured even the embedded demo
model (width 128) 1.7x faster with 2 threads than with 1 on 2 free cores, and 1.6-5.1x slower with 2 beside
one busy process (bench/README.md, "threads").

All of this unless the user chose: ``threads=`` (``--threads``), ``OMP_NUM_THREADS``/``MKL_NUM_THREADS``, or a
``torch.set_num_threads`` call that dpokit did not make. torch's inter-op pool is left alone: dpokit's work
runs no inter-op parallel sections.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

CGROUP_ROOT = Path("/sys/fs/cgroup")
# How often a training run looks again at the other processes' load (refresh_threads), in seconds
RECHECK_SECONDS = 15.0


@dataclass(frozen=True)
class ThreadChoice:
    """The intra-op thread count dpokit uses, and why."""

    threads: int
    reason: str

    def line(self) -> str:
        """The log line, e.g. ``threads: 1 (tiny model; 2 CPUs available)``."""
        return f"threads: {self.threads} ({self.reason})"


def affinity_cpus() -> int:
    """CPUs this process may run on (its affinity mask; all CPUs where the OS has no such call)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _own_cgroup_dirs(proc_cgroup: str, root: Path) -> list[Path]:
    """The directories of this process's CPU cgroups (v2 unified, v1 ``cpu``), most specific first."""
    dirs = []
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        relative = path.lstrip("/")
        if hierarchy == "0" and controllers == "":
            dirs += [root / relative, root]
        elif "cpu" in controllers.split(","):
            for name in (controllers, "cpu", "cpu,cpuacct"):
                dirs += [root / name / relative, root / name]
    return list(dict.fromkeys(dirs))


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cgroup_cpus(root: Path = CGROUP_ROOT, proc_cgroup: str | None = None) -> float | None:
    """CPUs allowed by this process's cgroup quota (quota / period), or None where there is no quota.

    cgroup v2 keeps ``"<quota|max> <period>"`` in ``cpu.max``; v1 keeps ``cpu.cfs_quota_us`` (-1: none) and
    ``cpu.cfs_period_us``. The smallest quota found on the process's own path wins.
    """
    if proc_cgroup is None:
        proc_cgroup = _read(Path("/proc/self/cgroup")) or "0::/"
    found: list[float] = []
    for directory in _own_cgroup_dirs(proc_cgroup, root):
        v2 = _read(directory / "cpu.max")
        if v2:
            quota, _, period = v2.partition(" ")
            if quota != "max" and period:
                found.append(int(quota) / int(period))
            continue
        quota, period = _read(directory / "cpu.cfs_quota_us"), _read(directory / "cpu.cfs_period_us")
        if quota and period and int(quota) > 0 and int(period) > 0:
            found.append(int(quota) / int(period))
    return min(found) if found else None


def available_cpus(root: Path = CGROUP_ROOT, proc_cgroup: str | None = None) -> int:
    """CPUs the process may use: its affinity mask, capped by its cgroup quota (rounded up), at least 1."""
    cpus = affinity_cpus()
    quota = cgroup_cpus(root, proc_cgroup)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def _running_elsewhere(proc_stat: str, own_running: int) -> int:
    """Runnable tasks of other processes: ``procs_running`` of /proc/stat less this process's running ones."""
    for line in proc_stat.splitlines():
        if line.startswith("procs_running "):
            return max(0, int(line.split()[1]) - own_running)
    return 0


def _own_running_threads() -> int:
    running = 0
    for task in Path("/proc/self/task").iterdir():
        stat = _read(task / "stat")
        # the state follows the parenthesised command name, which may itself hold spaces
        if stat and stat.rpartition(")")[2].split()[:1] == ["R"]:
            running += 1
    return max(1, running)


def busy_cpus(samples: int = 5, interval: float = 0.02) -> int:
    """CPUs other processes keep busy now: the fewest runnable tasks of other processes over a few samples
    (0 where /proc is not there). The minimum, so that a short-lived process does not count."""
    counts = []
    for i in range(samples):
        try:
            counts.append(_running_elsewhere(Path("/proc/stat").read_text(), _own_running_threads()))
        except OSError:
            return 0
        if i + 1 < samples:
            time.sleep(interval)
    return min(counts)


def explicit_threads(requested: int | None, environ: dict | None = None) -> ThreadChoice | None:
    """The user's own choice, where there is one: `requested`, then an earlier ``--threads``/``threads=`` of
    this process, then OMP_NUM_THREADS / MKL_NUM_THREADS (torch read them at start), then a
    ``torch.set_num_threads`` call dpokit did not make."""
    environ = os.environ if environ is None else environ
    if requested is not None:
        return ThreadChoice(requested, "--threads")
    if _STATE["pinned"] is not None:
        return ThreadChoice(_STATE["pinned"], "--threads")
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if environ.get(name, "").strip():
            return ThreadChoice(torch.get_num_threads(), name)
    expected = _STATE["applied"] if _STATE["applied"] is not None else _STATE["at_import"]
    if torch.get_num_threads() != expected:
        return ThreadChoice(torch.get_num_threads(), "torch.set_num_threads")
    return None


def choose_threads(width: int | None, cpus: int, busy: int = 0) -> ThreadChoice:
    """The automatic choice on `cpus` usable CPUs, `busy` of them held by other processes: one thread per free
    CPU, at least one. `width` (the model's hidden size) only goes into the reason shown."""
    plural = "s" if cpus != 1 else ""
    busy_note = f", {busy} busy with other processes" if busy else ""
    model = f"; model width {width}" if width is not None else ""
    return ThreadChoice(max(1, cpus - busy), f"{cpus} CPU{plural} available{busy_note}{model}")


# at_import: torch's count when dpokit was imported; applied: the count dpokit set last; pinned: the
# --threads/threads= of this process, which holds for its later work; logged: the last line logged;
# auto: what the last automatic choice was made for (width, CPUs, when), for refresh_threads
_STATE: dict = {"at_import": torch.get_num_threads(), "applied": None, "pinned": None, "logged": None, "auto": None}


def model_width(model) -> int | None:
    """The hidden size of a Hugging Face model (or of the model a PEFT/engine wrapper holds), if it says."""
    for candidate in (model, getattr(model, "module", None), getattr(model, "base_model", None)):
        config = getattr(candidate, "config", None)
        width = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
        if isinstance(width, int):
            return width
    return None


def config_width(path: str) -> int | None:
    """The hidden size in a model directory's (or hub model's cached) config, without loading the weights."""
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path)
    except Exception:  # noqa: BLE001 — an adapter directory or an unreadable config: the width is just unknown
        return None
    width = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    return width if isinstance(width, int) else None


def apply_threads(requested: int | None = None, *, width: int | None = None, device: str | torch.device = "cpu",
                  log: Callable[[str], None] = print) -> ThreadChoice:
    """Set torch's intra-op thread count for work on a model of hidden size `width` and log it when it changes.

    `requested` (``--threads``, ``TrainConfig.threads``) wins and holds for the rest of the process, like a
    ``torch.set_num_threads`` call; OMP_NUM_THREADS, MKL_NUM_THREADS and the user's own
    ``torch.set_num_threads`` are left as they are. Otherwise the count comes from :func:`choose_threads`.
    """
    if requested is not None and requested < 1:
        from dpokit.errors import ConfigError

        raise ConfigError(f"--threads must be at least 1; got {requested}")
    choice = explicit_threads(requested)
    _STATE["auto"] = None
    if choice is None:
        if torch.device(device).type != "cpu":
            # the CPU only feeds the accelerator: torch's default of one thread per usable CPU
            choice = ThreadChoice(available_cpus(), f"{torch.device(device).type} run")
        else:
            cpus = available_cpus()
            choice = choose_threads(width, cpus, busy_cpus())
            _STATE["auto"] = {"width": width, "cpus": cpus, "at": time.monotonic()}
    if choice.reason == "--threads":
        _STATE["pinned"] = choice.threads
    if choice.reason not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "torch.set_num_threads"):
        torch.set_num_threads(choice.threads)
        _STATE["applied"] = choice.threads
    if _STATE["logged"] != choice.line():
        log(choice.line())
        _STATE["logged"] = choice.line()
    return choice


def refresh_threads(log: Callable[[str], None] = print) -> None:
    """Between training steps: redo an automatic choice when other processes have started or stopped since it
    was made (looked at every RECHECK_SECONDS at most), so that a long run follows the machine's load. A count
    the user chose stays as it is."""
    auto = _STATE["auto"]
    if auto is None or time.monotonic() - auto["at"] < RECHECK_SECONDS:
        return
    auto["at"] = time.monotonic()
    if torch.get_num_threads() != _STATE["applied"]:  # set by the user since: theirs from now on
        _STATE["auto"] = None
        return
    choice = choose_threads(auto["width"], auto["cpus"], busy_cpus(samples=3, interval=0.01))
    if choice.threads != _STATE["applied"]:  # logged only when the count changes, not when the reason does
        torch.set_num_threads(choice.threads)
        _STATE["applied"] = choice.threads
        log(choice.line())
        _STATE["logged"] = choice.line()
