"""The harness every benchmark script shares: its common command-line options, the interleaved rounds, medians and
spreads, per-round ratios, the markdown table, the machine it ran on and the result JSON (bench/README.md).

What is specific to a script (its systems, its shape, its table's columns) stays in the script; what it runs in a
child process is set up by bench/_setup.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


# --------------------------------------------------------------------------------------------------------------
# command line


def harness_parser(doc: str, *, rounds: int | None = 3, rounds_help: str | None = None, steps: int | None = None,
                   warmup: int | None = None, batch_size: int | None = None, batch_help: str | None = None,
                   max_length: int | None = None,
                   threads: int | None = None, threads_help: str | None = None, systems: dict | None = None,
                   default_systems: list | None = None, child: str | None = "--child", seed: bool = True,
                   workdir: bool = True,
                   quick: str = "tiny check of the harness") -> argparse.ArgumentParser:
    """A parser with the options a benchmark script shares, each only where the script gives its default:
    --rounds, --steps / --warmup, --batch-size, --max-length, --threads, --systems (a subset of `systems`),
    --seed, --workdir, --out, --quick, and the hidden `child` option its child processes are started with."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    if child:
        add(child, help=argparse.SUPPRESS)
    if rounds is not None:
        add("--rounds", type=int, default=rounds, help=rounds_help or f"interleaved rounds (default {rounds})")
    if steps is not None:
        add("--steps", type=int, default=steps, help=f"training steps per run (default {steps})")
    if warmup is not None:
        add("--warmup", type=int, default=warmup, help=f"steps discarded at the start of each run (default {warmup})")
    if batch_size is not None:
        add("--batch-size", type=int, default=batch_size, help=batch_help or f"preference pairs per step (default {batch_size})")
    if max_length is not None:
        add("--max-length", type=int, default=max_length)
    if threads is not None:
        add("--threads", type=int, default=threads, help=threads_help or f"torch threads in every run (default {threads})")
    if systems is not None:
        add("--systems", default=",".join(default_systems or systems),
            help=f"comma-separated subset of: {', '.join(systems)} (default: {', '.join(default_systems or systems)})")
    if seed:
        add("--seed", type=int, default=0)
    if workdir:
        add("--workdir", help="keep the model, data and logs here (default: a temporary directory)")
    add("--out", default=str(RESULTS), help="directory for the JSON result")
    add("--quick", action="store_true", help=quick)
    return parser


def chosen_systems(parser: argparse.ArgumentParser, args, systems: dict) -> list[str]:
    """The names of --systems, in their order; a parser error for a name `systems` does not have."""
    names = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [n for n in names if n not in systems]
    if unknown:
        parser.error(f"unknown systems {unknown}; choose from {list(systems)}")
    return names


def apply_quick(args, **settings) -> None:
    """With --quick, the script's tiny settings replace the parsed ones."""
    if args.quick:
        for name, value in settings.items():
            setattr(args, name, value)


# --------------------------------------------------------------------------------------------------------------
# rounds


def alternating(names: list) -> callable:
    """A round order: `names` as given in even rounds, reversed in odd ones (a drift of the load hits both)."""
    return lambda round_: list(names) if round_ % 2 == 0 else list(reversed(names))


def interleave(rounds: int, order, run, report=None, *, warmup_rounds: int = 0) -> dict:
    """Run every system once per round, round after round: `order` is a list of names (the same order every
    round) or a function of the round giving it; `run(name, round_)` returns one run's result and
    `report(name, round_, result)` prints it. The first `warmup_rounds` rounds (numbered from -warmup_rounds) are
    run and discarded. Returns name -> the results of the measured rounds, in round order."""
    results: dict = {}
    for round_ in range(-warmup_rounds, rounds):
        for name in (order(round_) if callable(order) else order):
            result = run(name, round_)
            if report:
                report(name, round_, result)
            if round_ >= 0:
                results.setdefault(name, []).append(result)
    return results


def round_tag(round_: int, rounds: int) -> str:
    return "warm-up" if round_ < 0 else f"round {round_ + 1}/{rounds}"


# --------------------------------------------------------------------------------------------------------------
# medians, spreads, ratios


def median(xs) -> float:
    """The median; NaN for none."""
    return statistics.median(xs) if xs else float("nan")


def summary(xs) -> dict | None:
    """{"median", "min", "max"} of the values that are not None; None for none."""
    xs = [x for x in xs if x is not None]
    return {"median": median(xs), "min": min(xs), "max": max(xs)} if xs else None


def spread(xs, fmt: str = "{:.3f}") -> str:
    """"median (min–max)" of the values that are not None; the value alone for one, "–" for none."""
    s = summary(xs)
    if s is None:
        return "–"
    if len([x for x in xs if x is not None]) == 1:
        return fmt.format(s["median"])
    return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}–{fmt.format(s['max'])})"


def fmt_summary(s: dict | None, digits: int = 2, scale: float = 1.0) -> str:
    """A :func:`summary` as "median (min–max)"; "–" for none."""
    if not s:
        return "–"
    return f"{s['median'] * scale:.{digits}f} ({s['min'] * scale:.{digits}f}–{s['max'] * scale:.{digits}f})"


def per_round(a: list, b: list, value, *, skip_failed: bool = False) -> list[float]:
    """value(run of a, run of b) for the two runs of every round (without rounds where one failed)."""
    return [value(x, y) for x, y in zip(a, b) if not (skip_failed and (x.get("failed") or y.get("failed")))]


def step_rates(run: dict, warmup: int) -> tuple[float, float]:
    """One training run's median seconds per step and its tokens per second, over the steps after `warmup`."""
    sec = run["seconds_per_step"][warmup:]
    return median(sec), sum(run["tokens_per_step"][warmup:]) / sum(sec)


def run_line(round_: int, rounds: int, name: str, run: dict, warmup: int, width: int = 24) -> str:
    """The line a training run prints when it ends: s/step, tokens/s, peak RSS, the child's wall time."""
    if run.get("failed"):
        return (f"{round_tag(round_, rounds)} {name:{width}s} FAILED (exit {run['returncode']}); log tail:\n"
                f"{run['log_tail'][-3000:]}")
    sec, rate = step_rates(run, warmup)
    return (f"{round_tag(round_, rounds)} {name:{width}s} {sec:7.3f} s/step  {rate:8.0f} tokens/s  "
            f"peak RSS {run['peak_rss_mib']:7.0f} MiB  (child {run['child_wall_seconds']:.0f} s)")


# --------------------------------------------------------------------------------------------------------------
# tables and results


def markdown(header: list[str], rows: list[list]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def versions(modules=("torch", "transformers", "trl", "datasets", "tokenizers", "accelerate", "peft", "dpokit")) -> dict:
    out = {}
    for mod in modules:
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            out[mod] = None
    return out


def machine(**extra) -> dict:
    """Where the benchmark ran: platform, Python, CPUs, package versions, the dpokit it imported (a PYTHONPATH
    may name another tree than the editable install), load average now, and `extra`."""
    try:
        import dpokit

        dpokit_from = str(Path(dpokit.__file__).resolve().parent)
    except ImportError:
        dpokit_from = None
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "versions": versions(), "dpokit_from": dpokit_from, "load_average": os.getloadavg(), **extra}


def tree_state(repo: Path = HERE.parent) -> dict:
    """Which dpokit was measured: HEAD and a digest of the uncommitted changes and untracked files under src/."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True).stdout

    diff = git("diff", "HEAD", "--", "src")
    untracked = sorted(git("ls-files", "--others", "--exclude-standard", "--", "src").split())
    digest = hashlib.sha1(diff.encode())
    for path in untracked:
        digest.update(path.encode() + (repo / path).read_bytes())
    return {"head": git("rev-parse", "HEAD").strip(), "src_uncommitted_diff_lines": diff.count("\n"),
            "src_untracked": untracked, "src_state_sha1": digest.hexdigest()}


def write_result(args, prefix: str, payload: dict, started: float | None = None, machine_extra: dict | None = None,
                 stamp: str | None = None) -> Path:
    """bench/results (or --out)/<prefix><timestamp>[-quick].json holding the arguments, `payload`, the wall
    seconds since `started` and the machine (:func:`machine`, with `machine_extra`)."""
    stamp = stamp or time.strftime("%Y%m%d-%H%M%S")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{prefix}{stamp}{'-quick' if getattr(args, 'quick', False) else ''}.json"
    data = {"args": vars(args), **payload}
    if started is not None:
        data["wall_seconds"] = time.perf_counter() - started
    data["machine"] = machine(**(machine_extra or {}))
    path.write_text(json.dumps(data, indent=1, default=str))
    return path


# --------------------------------------------------------------------------------------------------------------
# one change on and off within one process


def on_off(step, batches: list) -> tuple[list[float], list[float], list[tuple]]:
    """An A/B of one change within one run. `step(flag, batch)` runs a batch with the change on (True) or off and
    returns (seconds, result); both run on every batch, the order flipped every batch, after one call of each on the
    first batch (first-call allocations). Returns the seconds on, the seconds off and each batch's (result on,
    result off)."""
    step(True, batches[0]), step(False, batches[0])
    on, off, results = [], [], []
    for i, batch in enumerate(batches):
        order = (True, False) if i % 2 else (False, True)
        ran = {flag: step(flag, batch) for flag in order}
        on.append(ran[True][0])
        off.append(ran[False][0])
        results.append((ran[True][1], ran[False][1]))
    return on, off, results


def speedup(on: list[float], off: list[float]) -> str:
    """The per-batch speed-ups of an :func:`on_off` run: median (min-max)."""
    ratios = [b / a for a, b in zip(on, off)]
    return f"x{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})"


def matmul_gflops(threads: int, size: int, repeats: int = 5) -> float:
    """Best-of-`repeats` float32 [size x size] @ [size x 4 size] rate in GFLOP/s with `threads` threads."""
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(size, size)
    b = torch.randn(size, 4 * size)
    torch.mm(a, b)
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(3):
            torch.mm(a, b)
        best = min(best, (time.perf_counter() - t) / 3)
    return 2.0 * size * size * 4 * size / best / 1e9
