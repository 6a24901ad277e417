#!/usr/bin/env python
"""dpokit on a busy machine: the demo and a benchmark-shape DPO step, quiet and beside busy processes.

    python bench/bench_contention.py                  # 2 interleaved rounds, loads 0/1/2, before and after
    python bench/bench_contention.py --quick          # a small demo and 2 steps, 1 round: checks the harness

Every run is a child process, timed from start to exit, under one of two thread settings:

* ``before``: ``--threads N`` with N = the CPUs available to the process, which is torch's default and what
  dpokit ran with before it chose a thread count itself;
* ``after``: dpokit's automatic choice (dpokit/threads.py), with OMP_NUM_THREADS and MKL_NUM_THREADS removed
  from the child's environment.

and one of three loads: quiet, or 1 or 2 busy background processes (``while True: pass`` in a Python child,
started before the run, bounded by the run's time limit and killed in a ``finally`` block). Workloads:

* ``demo``: ``dpokit demo`` with its default settings (or ``--demo-args``); the stages are timed from the
  demo's own ``[k/4]`` lines: start-up, SFT, sampling + labelling, DPO (precompute + training), evaluation;
* ``step``: ``train_dpo`` on the benchmark shape of bench_vs_trl.py (random Llama, hidden 256, 4 layers,
  vocabulary 8192, 8 pairs of ~200 + 2 x ~120 tokens per step), seconds per step after a warm-up step.

Rounds interleave every (load, workload, setting); the order of the settings alternates between rounds. A run
that passes ``--timeout`` is stopped and counted at the limit (a lower bound, marked ``>``). The result JSON
(every run, the load average before each, the thread line each child logged) goes to
``bench/results/contention-<timestamp>.json`` and a markdown table to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _harness import harness_parser, interleave, write_result
from _setup import build_everything, loadavg, quiet_environment, start_busy, stop

HERE = Path(__file__).resolve().parent
STAGES = ("start-up", "SFT", "sampling", "DPO", "evaluation")


# --------------------------------------------------------------------------------------------------------------
# one timed child


def child_env() -> dict:
    """The user's environment without thread settings, so the child makes its own choice; unbuffered output
    so that the demo's stage lines arrive when they are printed."""
    return quiet_environment(drop=("OMP_NUM_THREADS", "MKL_NUM_THREADS"), PYTHONUNBUFFERED="1")


def run_timed(command: list[str], timeout: float, log_path: Path) -> dict:
    """Run `command`, timing it to its exit and the demo's ``[k/4]`` stage lines; stop it after `timeout` s."""
    started = time.perf_counter()
    marks: list[float] = []
    thread_line = None
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env(),
                            start_new_session=True)
    timer = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
    timer.start()
    try:
        with log_path.open("w") as log:
            for line in proc.stdout:
                log.write(line)
                if re.match(r"\[\d/4\]", line):
                    marks.append(time.perf_counter() - started)
                elif line.startswith("threads: ") and thread_line is None:
                    thread_line = line.strip()
        proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    seconds = time.perf_counter() - started
    timed_out = proc.returncode == -signal.SIGKILL and seconds >= timeout - 1
    if proc.returncode != 0 and not timed_out:
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}); log: {log_path}\n"
                         + log_path.read_text()[-3000:])
    result = {"seconds": min(seconds, timeout) if timed_out else seconds, "timed_out": timed_out,
              "thread_line": thread_line}
    if marks:
        bounds = [0.0] + marks + ([seconds] if not timed_out else [])
        result["stages"] = {name: bounds[i + 1] - bounds[i] for i, name in enumerate(STAGES) if i + 1 < len(bounds)}
    return result


# --------------------------------------------------------------------------------------------------------------
# the benchmark-shape step (child side)


def child_step(spec: dict) -> None:
    """Train `spec["steps"]` DPO steps on the benchmark model and print seconds per step as JSON."""
    from dpokit.api import train_dpo
    from dpokit.config import TrainConfig
    from dpokit.train.metrics import read_metrics

    config = TrainConfig(model=spec["model_dir"], data=spec["data"], output=spec["output"], batch_size=8,
                         max_length=512, max_prompt_length=spec["max_prompt_length"], max_steps=spec["steps"],
                         optimizer="adamw", lr=1e-6, warmup_steps=0, seed=0, save_final=False, data_cache=False,
                         overwrite=True, threads=spec["threads"], save_every_minutes=0)
    train_dpo(config)
    rows = [r for r in read_metrics(Path(spec["output"]) / "metrics.jsonl") if r["split"] == "train"]
    print("RESULT " + json.dumps([r["seconds_per_step"] for r in rows]), flush=True)


def build_step_inputs(work: Path, pairs: int) -> dict:
    """The benchmark's tokenizer, model and data (bench_vs_trl.py's default shape)."""
    shape = argparse.Namespace(seed=0, vocab=8192, hidden=256, layers=4, heads=4, intermediate=None,
                               max_length=512, pairs=pairs, prompt_len=200, response_len=120, spread=0.3)
    return build_everything(shape, work)


# --------------------------------------------------------------------------------------------------------------
# rounds and report


def cpus_available() -> int:
    """What the `before` setting pins: the CPUs this process may use (affinity and cgroup quota)."""
    from dpokit.runtime.threads import available_cpus

    return available_cpus()


def one_run(workload: str, setting: str, load: int, args, work: Path, setup: dict | None, index: int) -> dict:
    threads = ["--threads", str(cpus_available())] if setting == "before" else []
    out = work / f"{workload}-{setting}-{load}-{index}"
    if workload == "demo":
        command = [sys.executable, "-m", "dpokit.cli.main", "demo", "--output", str(out), *threads, *args.demo_args]
    else:
        spec = dict(setup, output=str(out), steps=args.steps + args.warmup,
                    threads=int(threads[1]) if threads else None)
        spec_path = work / f"spec-{index}.json"
        spec_path.write_text(json.dumps(spec))
        command = [sys.executable, __file__, "--child-step", str(spec_path)]
    busy = start_busy(load, args.timeout + 60)
    try:
        load_before = loadavg()
        result = run_timed(command, args.timeout, work / f"log-{index}.txt")
    finally:
        stop(busy)
    if workload == "step":
        steps = step_seconds(out, work / f"log-{index}.txt")
        result["seconds_per_step"] = steps
        timed = steps[args.warmup:]
        # a stopped run counts by the steps it finished; with none, it has no step time (shown as "stopped")
        result["seconds"] = statistics.median(timed) if timed else None
    shutil.rmtree(out, ignore_errors=True)
    return dict(result, workload=workload, setting=setting, load=load, loadavg_before=load_before)


def step_seconds(output: Path, log: Path) -> list[float]:
    """Seconds of every finished step: the child's RESULT line, or (run stopped) its metrics.jsonl so far."""
    for line in log.read_text().splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    metrics = output / "metrics.jsonl"
    if not metrics.exists():
        return []
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [r["seconds_per_step"] for r in rows if r.get("split") == "train"]


def summarise(runs: list[dict]) -> list[dict]:
    """Median and range per (workload, load, setting), and slowdowns against the same setting's quiet median."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["workload"], run["load"], run["setting"]), []).append(run)
    rows = []
    for (workload, load, setting), group in sorted(groups.items()):
        seconds = [r["seconds"] for r in group if r["seconds"] is not None]
        quiet = [r for r in groups.get((workload, 0, setting), []) if r["seconds"] is not None]
        # against a quiet median that is itself a lower bound (stopped runs), a slowdown means nothing
        quiet_median = statistics.median(r["seconds"] for r in quiet) \
            if quiet and not any(r["timed_out"] for r in quiet) else None
        stages = {}
        for name in STAGES:
            values = [r["stages"][name] for r in group if name in r.get("stages", {})]
            if values:
                stages[name] = statistics.median(values)
        median = statistics.median(seconds) if seconds else None
        rows.append({"workload": workload, "load": load, "setting": setting, "runs": len(group),
                     "median": median, "min": min(seconds, default=None), "max": max(seconds, default=None),
                     "timed_out": sum(r["timed_out"] for r in group),
                     "loadavg": statistics.median(r["loadavg_before"] for r in group),
                     "slowdown": median / quiet_median if quiet_median and median else None,
                     "threads": sorted({r["thread_line"] for r in group if r["thread_line"]}),
                     "stage_medians": stages})
    return rows


def table(rows: list[dict], unit: dict[str, str]) -> str:
    """Markdown: one line per (workload, load), before and after side by side."""
    by_key = {(r["workload"], r["load"], r["setting"]): r for r in rows}
    lines = ["| workload | busy processes | load avg. | before: all cores | slowdown | after: automatic | slowdown "
             "| after's threads |", "|---|---|---|---|---|---|---|---|"]

    def cell(r):
        if r is None:
            return "–", "–"
        if r["median"] is None:
            return f"stopped at {r['timeout']:.0f} s before a timed step (n={r['runs']})", "–"
        mark = ">" if r["timed_out"] else ""  # a stopped run counts at the limit: a lower bound
        stopped = f", {r['timed_out']} stopped" if r["timed_out"] else ""
        text = (f"{mark}{r['median']:.1f} {unit[r['workload']]} ({r['min']:.1f}–{r['max']:.1f}, n={r['runs']}"
                f"{stopped})")
        return text, f"{mark}{r['slowdown']:.1f}x" if r["slowdown"] else "–"

    for workload, load in sorted({(r["workload"], r["load"]) for r in rows}):
        before, after = by_key.get((workload, load, "before")), by_key.get((workload, load, "after"))
        threads = "; ".join(after["threads"]) if after else "–"
        loadavg = "/".join(f"{r['loadavg']:.1f}" for r in (before, after) if r)
        lines.append(f"| {workload} | {load} | {loadavg} | {' | '.join(cell(before))} | {' | '.join(cell(after))} "
                     f"| {threads} |")
    return "\n".join(lines)


def stage_table(rows: list[dict]) -> str:
    """Markdown: the demo's stage medians per load and setting."""
    lines = ["| demo stage medians (s) | " + " | ".join(STAGES) + " |", "|---" * (len(STAGES) + 1) + "|"]
    for r in rows:
        if r["workload"] == "demo" and r["stage_medians"]:
            cells = [f"{r['stage_medians'][n]:.1f}" if n in r["stage_medians"] else "–" for n in STAGES]
            lines.append(f"| {r['setting']}, {r['load']} busy | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args():
    parser = harness_parser(__doc__, rounds=2, steps=3, warmup=1, child="--child-step", seed=False, workdir=False,
                            quick="a small demo, 2 steps, 1 round, loads 0,1")
    parser.add_argument("--loads", default="0,1,2", help="busy background processes per run (default 0,1,2)")
    parser.add_argument("--workloads", default="demo,step", help="demo, step or both (default both)")
    parser.add_argument("--settings", default="before,after", help="before, after or both (default both)")
    parser.add_argument("--timeout", type=float, default=240, help="seconds before a run is stopped (default 240)")
    parser.add_argument("--demo-args", default="", help="extra `dpokit demo` flags, one string")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.loads, args.steps, args.timeout = 1, "0,1", 1, min(args.timeout, 120)
        args.demo_args = args.demo_args or ("--sft-reviews 200 --sft-steps 5 --prompts 16 --dpo-steps 5 "
                                            "--eval-prompts 8 --max-new-tokens 8")
    args.demo_args = args.demo_args.split()
    return args


def measure(args, work: Path) -> list[dict]:
    """Every (load, workload, setting) once per round, the order of the settings alternating between rounds."""
    loads = [int(x) for x in args.loads.split(",")]
    workloads, settings = args.workloads.split(","), args.settings.split(",")
    setup = None
    if "step" in workloads:
        described = build_step_inputs(work / "inputs", pairs=8 * (args.steps + args.warmup))
        setup = {k: described[k] for k in ("model_dir", "data", "max_prompt_length")}
    runs: list[dict] = []

    def order(round_):
        return [(load, workload, setting) for load in loads for workload in workloads
                for setting in (settings if round_ % 2 == 0 else settings[::-1])]

    def run(key, round_):
        load, workload, setting = key
        return dict(one_run(workload, setting, load, args, work, setup, len(runs)), round=round_)

    def report(key, round_, result):
        runs.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "seconds_per_step"}), flush=True)

    interleave(args.rounds, order, run, report)
    return runs


def main() -> None:
    args = parse_args()
    if args.child_step:
        child_step(json.loads(Path(args.child_step).read_text()))
        return
    started = time.strftime("%Y%m%d-%H%M%S")
    with tempfile.TemporaryDirectory(prefix="dpokit-contention-") as tmp:
        runs = measure(args, Path(tmp))
    rows = summarise(runs)
    for row in rows:
        row["timeout"] = args.timeout
    unit = {"demo": "s", "step": "s/step"}
    text = table(rows, unit) + "\n\n" + stage_table(rows)
    print(f"\n{os.cpu_count()} CPUs, {cpus_available()} available; load average before the runs: "
          f"min {min(r['loadavg_before'] for r in runs):.2f}, max {max(r['loadavg_before'] for r in runs):.2f}\n")
    print(text)
    import torch

    path = write_result(args, "contention-", {"cpus": os.cpu_count(), "cpus_available": cpus_available(),
                                              "platform": platform.platform(), "python": platform.python_version(),
                                              "torch": torch.__version__, "summary": rows, "runs": runs, "table": text},
                        stamp=started)
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
