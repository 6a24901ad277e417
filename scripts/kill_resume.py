#!/usr/bin/env python
"""Kill a DPO run with SIGKILL at random moments, resume it with --resume, and check that it ends exactly like an
uninterrupted run: the same final weights (byte for byte) and the same metrics rows (all but the timings).

    python scripts/kill_resume.py --kills 40 --seed 1          # the stress run (README: Runs that survive)
    python scripts/kill_resume.py --kills 20 --streaming       # the same with --streaming --no-data-cache

tests/train/test_kill_resume.py runs 10 kill points of it in CI. The run (8 steps, a checkpoint every 2, evaluation
every 3, reference log-probs precomputed and cached) spends its time in the phases a kill can hit: loading,
the reference pass and its cache write, forward/backward, evaluation, checkpoint writes. Kill times are drawn
(seeded) from the span of the uninterrupted run's work, counted from the moment a run takes its output
directory (its lock file appears: imports are done). With --streaming every run and every resume streams its data
into temporary shards (--no-data-cache), so kills also land while shards are written, and the script checks that
no temporary shards outlive the runs. Tokenised data is cached under the work directory, never ~/.cache.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STREAMING = ("--streaming", "--no-data-cache")


def _env(output: Path) -> dict:
    """The runs' environment: one thread each, the data cache in the work directory (beside `output`)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "DPOKIT_CACHE": str(output.parent / "data-cache")}
TIMING = {"tokens_per_second", "seconds_per_step"}


def run_args(model: str, data: str, eval_data: str, output: Path, extra: tuple[str, ...] = ()) -> list[str]:
    """The run that gets killed: small, but with every phase (`extra`: more options, e.g. STREAMING)."""
    return ["dpo", "--model", model, "--data", data, "--eval-data", eval_data, "--output", str(output),
            "--batch-size", "4", "--max-steps", "8", "--save-every", "2", "--eval-every", "3", "--lr", "1e-3",
            "--warmup-steps", "2", "--precompute-ref", "--seed", "5", *extra]


def _command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "dpokit.cli.main", *args]


def rows(output: Path) -> list[dict]:
    """Metrics rows without the timings (which differ from run to run)."""
    lines = (output / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def _wait_for_work(process: subprocess.Popen, output: Path) -> float:
    """Wait until the run holds its output directory (imports done, real work begun); return when that was."""
    while not (output / ".dpokit.lock").exists() and process.poll() is None:
        time.sleep(0.01)
    return time.monotonic()


def reference_run(model: str, data: str, eval_data: str, workdir: Path,
                  extra: tuple[str, ...] = ()) -> tuple[Path, float]:
    """The uninterrupted run: its output, and how long its work lasted (from taking the output directory)."""
    output = workdir / "whole"
    process = subprocess.Popen(_command(run_args(model, data, eval_data, output, extra)), env=_env(output),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    began = _wait_for_work(process, output)
    if process.wait() != 0:
        raise RuntimeError("the uninterrupted run failed")
    return output, time.monotonic() - began


def kill_and_resume(model: str, data: str, eval_data: str, output: Path, delay: float,
                    extra: tuple[str, ...] = ()) -> dict:
    """SIGKILL the run `delay` seconds into its work, resume it to the end; say where it died."""
    args = run_args(model, data, eval_data, output, extra)
    process = subprocess.Popen(_command(args), env=_env(output), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_work(process, output)
    try:
        process.wait(timeout=delay)
        killed = False  # it finished first
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        killed = True
    left = sorted(p.name for p in output.glob("*") if p.name != ".dpokit.lock") if output.exists() else []
    resumed = subprocess.run(_command(args + ["--resume"]), env=_env(output), capture_output=True, text=True,
                             timeout=600)
    return {"delay": round(delay, 2), "killed": killed, "left": left, "resume_code": resumed.returncode,
            "resume_tail": resumed.stderr[-1500:]}


def phases(results: list[dict]) -> dict[str, int]:
    """How many kill points left which state behind (where they died, roughly)."""
    counts: dict[str, int] = {}
    for result in results:
        left = result["left"]
        name = ("an unfinished checkpoint or model write" if any(n.endswith(".tmp") for n in left) else
                "nothing written yet (loading, tokenising)" if not left else
                f"{sum(n.startswith('checkpoint-') for n in left)} checkpoints"
                + (", evaluation or training after them" if "metrics.jsonl" in left else ""))
        counts[name] = counts.get(name, 0) + 1
    return counts


def check(whole: Path, output: Path) -> list[str]:
    """What differs between a resumed run and the uninterrupted one (empty: nothing)."""
    problems = []
    final = output / "final" / "model.safetensors"
    if not final.exists():
        return ["no final model"]
    if final.read_bytes() != (whole / "final" / "model.safetensors").read_bytes():
        problems.append("final weights differ")
    if rows(output) != rows(whole):
        problems.append("metrics rows differ")
    return problems


def run_kill_points(model: str, data: str, eval_data: str, workdir: Path, kills: int, seed: int,
                    parallel: int = 2, extra: tuple[str, ...] = ()) -> list[dict]:
    """`kills` seeded kill points, `parallel` at a time (each run uses one thread); each result says when it was
    killed, what it left, and what differed."""
    from concurrent.futures import ThreadPoolExecutor

    whole, work = reference_run(model, data, eval_data, workdir, extra)
    rng = random.Random(seed)
    delays = [rng.uniform(0.0, work) for _ in range(kills)]

    def one(k: int) -> dict:
        output = workdir / f"kill-{k:03d}"
        result = kill_and_resume(model, data, eval_data, output, delays[k], extra)
        result["problems"] = ["resume failed"] if result["resume_code"] else check(whole, output)
        return result

    with ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(one, range(kills)))


def main() -> int:
    """Build a tiny model and data (as the tests do), run the kill points, print a summary and a JSON report."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=40)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--parallel", type=int, default=2, help="kill points run at once")
    parser.add_argument("--workdir", help="keep everything here (default: a temporary directory)")
    parser.add_argument("--streaming", action="store_true", help="runs with --streaming --no-data-cache")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import write_sentiment_pairs
    from helpers import make_llama, make_tokenizer

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dpokit-kill-"))
    tokenizer = make_tokenizer()
    model = workdir / "model"
    make_llama(vocab_size=len(tokenizer)).save_pretrained(model)
    tokenizer.save_pretrained(model)
    data = write_sentiment_pairs(workdir / "train.jsonl", 200, seed=0)
    eval_data = write_sentiment_pairs(workdir / "eval.jsonl", 15, seed=1)
    started = time.monotonic()
    results = run_kill_points(str(model), data, eval_data, workdir, args.kills, args.seed, args.parallel,
                              STREAMING if args.streaming else ())
    bad = [r for r in results if r["problems"]]
    leftover = sorted(p.name for p in (workdir / "data-cache").glob(".tmp-*"))
    if args.streaming and leftover:
        bad.append({"problems": [f"temporary shards left behind: {leftover}"]})
        print(f"temporary shards left behind: {leftover}")
    print(json.dumps(results, indent=1))
    print("killed after:", json.dumps(phases(results)))
    print(f"{len(results)} kill points ({sum(r['killed'] for r in results)} killed before the end), "
          f"{len(bad)} with differences, {time.monotonic() - started:.0f} s; workdir {workdir}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
