"""Time `dpokit demo` at its default sizes (issue: it must finish within 5 minutes on 2 CPU cores).

Runs the demo `--repeats` times in child processes (each with its own output directory), and prints the wall
time and peak resident memory of each run, their median and spread, and the demo's headline results, so the
time and the targets (positive share +30 points, held-out reward accuracy >= 0.8) come from the same runs.

    python bench/bench_demo.py [--repeats 3] [-- extra demo flags]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_once(output: Path, extra: list[str]) -> dict:
    """One `dpokit demo` in a child process: wall seconds, peak RSS of the child, and its report."""
    started = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run([sys.executable, "-m", "dpokit.cli.main", "demo", "--output", str(output), *extra], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # max over children so far (KiB)
    report = json.loads((output / "report.json").read_text())
    return {"seconds": seconds, "peak_rss_mib": peak / 1024 if peak > before else None,
            "sft_positive": report["sft"]["positive_share"], "dpo_positive": report["dpo"]["positive_share"],
            "accuracy": report["held_out_reward_accuracy"], "kl": report["kl"]["mean"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("extra", nargs="*", help="flags passed to dpokit demo (after --)")
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            runs.append(run_once(Path(tmp) / f"run{i}", args.extra))
            print(json.dumps(runs[-1]), flush=True)
    seconds = [r["seconds"] for r in runs]
    print(f"\ncores: {os.cpu_count()}; dpokit demo {' '.join(args.extra)}")
    print(f"wall time: median {statistics.median(seconds):.1f} s (min {min(seconds):.1f}, max {max(seconds):.1f}) "
          f"over {len(runs)} runs; peak RSS of the first run {runs[0]['peak_rss_mib']:.0f} MiB")
    for key in ("sft_positive", "dpo_positive", "accuracy", "kl"):
        values = [r[key] for r in runs]
        print(f"{key:13s} median {statistics.median(values):.3f} (min {min(values):.3f}, max {max(values):.3f})")


if __name__ == "__main__":
    main()
