"""Time `dpokit --version`, `dpokit dpo --help` and a mistyped option: the command line's answer time.

    python bench/bench_cli.py --rounds 5 [--baseline COMMIT]

Each case runs as a fresh `python -m dpokit.cli.main` process (the time a user waits). With --baseline, the same cases
run against that commit's `src/` (extracted with `git archive` into a temporary directory), interleaved round by
round with the working tree so that load on the machine hits both alike. Prints the median, min and max per case.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = {
    "--version": ["--version"],
    "dpo --help": ["dpo", "--help"],
    "mistyped option": ["dpo", "--bta", "0.1", "--model", "m", "--data", "d", "--output", "o"],
}


def seconds(src: Path, args: list[str]) -> float:
    """Wall time of one `python -m dpokit.cli.main ARGS` with `src` first on the import path."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dpokit.cli.main", *args], capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(src)})
    return time.perf_counter() - start


def main() -> None:
    """Run the cases and print their medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--baseline", help="a commit to compare with (its src/ via git archive)")
    args = parser.parse_args()
    trees = {"working tree": ROOT / "src"}
    with tempfile.TemporaryDirectory() as tmp:
        if args.baseline:
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline, "src"], capture_output=True,
                                     check=True).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
            trees[args.baseline] = Path(tmp) / "src"
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.rounds):
            for case, case_args in CASES.items():
                for name, src in trees.items():
                    times.setdefault((case, name), []).append(seconds(src, case_args))
    for (case, name), values in times.items():
        print(f"{case:18s} {name:14s} median {statistics.median(values):6.2f} s  "
              f"(min {min(values):.2f}, max {max(values):.2f}, {len(values)} runs)")


if __name__ == "__main__":
    main()
