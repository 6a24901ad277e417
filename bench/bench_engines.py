#!/usr/bin/env python
"""DDP through the engine (working tree) vs the hand-written all-reduce loop (commit a932e1e), 2 CPU processes.

    python bench/bench_engines.py                 # 3 interleaved rounds, 10 steps per run (~5-10 min on 2 cores)
    python bench/bench_engines.py --quick         # 1 round, 3 steps: checks the harness

Both versions run the same command, ``accelerate launch --multi_gpu --num_processes 2 --num_machines 1
--mixed_precision no --dynamo_backend no --main_process_port <free port> -m dpokit.cli.main dpo ...`` with
``OMP_NUM_THREADS=1`` and ``TOKENIZERS_PARALLELISM=false`` (the launch of tests/train/test_loop.py's two-process
test), on the same locally built Llama and preference data (bench/_setup.py). The old code is checked out with
``git worktree add`` into a temporary directory and imported through ``PYTHONPATH=<worktree>/src`` (which comes
before the editable install of the working tree on sys.path); the worktree is removed at the end.

Measured: ``seconds_per_step`` of every ``split == "train"`` row of OUTPUT/metrics.jsonl (written by the main
process; the trainer's own clock, from the start of a step through the optimizer step and the logged
metrics), the median over the steps after ``--warmup`` per run, then median (min-max) over rounds; the ratio
new/old per round (the two runs of a round), summarised the same way; and the wall time of the whole launch.
The per-step losses of the two versions are compared too (same data, same update: they should agree).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from _harness import (alternating, apply_quick, harness_parser, interleave, markdown, median, round_tag, spread,
                      tree_state, write_result)
from _setup import add_shape_options, build_inputs, free_port, quiet_environment, workdir

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _env(src: Path, threads: int) -> dict:
    return quiet_environment(threads=threads, drop=("ACCELERATE_USE_CPU",), PYTHONPATH=str(src))


def _imported_from(src: Path, threads: int) -> str:
    out = subprocess.run([sys.executable, "-c", "import dpokit; print(dpokit.__file__)"], env=_env(src, threads),
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def _cli_module(src: Path) -> str:
    """The command line's module in that tree: dpokit.cli.main since the subpackages, dpokit.cli before (a932e1e)."""
    return "dpokit.cli" if (src / "dpokit" / "cli.py").exists() else "dpokit.cli.main"


def run_launch(version: str, src: Path, setup: dict, args, work: Path, round_: int) -> dict:
    output = work / f"run_{version}_{round_}"
    shutil.rmtree(output, ignore_errors=True)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(args.processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", _cli_module(src),
           "dpo", "--model", setup["model_dir"], "--data", setup["data"], "--output", str(output),
           "--batch-size", str(args.batch_size), "--max-steps", str(args.steps), "--lr", "1e-5",
           "--warmup-steps", "0", "--optimizer", "adamw", "--max-length", str(args.max_length),
           "--max-prompt-length", str(setup["max_prompt_length"]), "--seed", str(args.seed), "--no-save-final"]
    log = work / f"log_{version}_{round_}.txt"
    started = time.perf_counter()
    with log.open("w") as handle:
        proc = subprocess.run(cmd, env=_env(src, args.threads), stdout=handle, stderr=subprocess.STDOUT,
                              cwd=work, timeout=args.timeout)
    wall = time.perf_counter() - started
    metrics = output / "metrics.jsonl"
    if proc.returncode != 0 or not metrics.exists():
        raise SystemExit(f"{version} (round {round_}) failed with exit code {proc.returncode}: "
                         f"{' '.join(cmd)}\nlog tail:\n{log.read_text()[-4000:]}")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("split") == "train"]
    text = log.read_text()
    shutil.rmtree(output, ignore_errors=True)
    return {"seconds_per_step": [r["seconds_per_step"] for r in train], "loss": [r["loss"] for r in train],
            "grad_norm": [r.get("grad_norm") for r in train], "launch_wall_seconds": wall,
            "two_processes_confirmed": f"x {args.processes} processes" in text, "command": cmd}


def parse_args():
    parser = harness_parser(__doc__, rounds=3, steps=10, warmup=2, batch_size=4, max_length=256, threads=1,
                            batch_help="pairs per process per step (default 4)",
                            threads_help="OMP_NUM_THREADS per process (default 1)", child=None,
                            quick="1 round, 3 steps, hidden 64, 2 layers")
    parser.add_argument("--old", default="a932e1e", help="commit of the hand-written all-reduce loop (default a932e1e)")
    parser.add_argument("--processes", type=int, default=2)
    add_shape_options(parser, prompt_len=64, response_len=48)
    parser.add_argument("--timeout", type=int, default=900, help="seconds allowed per launch")
    args = parser.parse_args()
    apply_quick(args, rounds=1, steps=3, warmup=1, hidden=64, layers=2, heads=2, max_length=128, prompt_len=32,
                response_len=16)
    args.pairs = args.batch_size * args.processes * args.steps
    return args


@contextmanager
def old_tree(commit: str):
    """The source trees of the two versions, the old one checked out in a temporary worktree (removed after)."""
    tree = Path(tempfile.mkdtemp(prefix="dpokit_old_")) / "tree"
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), commit], cwd=REPO, check=True,
                   capture_output=True)
    try:
        yield {"new": REPO / "src", "old": tree / "src"}
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, capture_output=True)
        shutil.rmtree(tree.parent, ignore_errors=True)


def summarise(args, results: dict) -> tuple[dict, str]:
    """Per-round medians and new / old ratios, and their table."""
    w = args.warmup
    per_round = {v: [median(r["seconds_per_step"][w:]) for r in rs] for v, rs in results.items()}
    walls = {v: [r["launch_wall_seconds"] for r in rs] for v, rs in results.items()}
    ratios = [a / b for a, b in zip(per_round["new"], per_round["old"])]
    wall_ratios = [a / b for a, b in zip(walls["new"], walls["old"])]
    loss_diff = max(abs(a - b) for rn, ro in zip(results["new"], results["old"])
                    for a, b in zip(rn["loss"], ro["loss"]))
    text = "\n".join([
        markdown(["version", "s/step", "launch wall s"],
                 [["new: engine DDP (working tree)", spread(per_round["new"]), spread(walls["new"], "{:.1f}")],
                  [f"old: hand-written all-reduce ({args.old})", spread(per_round["old"]), spread(walls["old"], "{:.1f}")]]),
        "", markdown(["ratio new / old (per round)", "median (min–max)"],
                     [["s/step", spread(ratios)], ["launch wall time", spread(wall_ratios)]])])
    return {"seconds_per_step": per_round, "launch_wall_seconds": walls, "ratio_new_over_old": ratios,
            "wall_ratio_new_over_old": wall_ratios, "max_abs_loss_difference": loss_diff}, text


def main() -> None:
    args = parse_args()
    t0 = time.perf_counter()
    with workdir(args, "dpokit_engines_") as work, old_tree(args.old) as sources:
        where = {v: _imported_from(s, args.threads) for v, s in sources.items()}
        for v, s in sources.items():
            if not Path(where[v]).resolve().is_relative_to(s.resolve()):
                raise SystemExit(f"{v}: dpokit imported from {where[v]}, not from {s}")
        print(f"new: {where['new']}\nold: {where['old']} (commit {args.old})", flush=True)
        tree = tree_state(REPO)
        setup = build_inputs(args, work)
        results = interleave(args.rounds, alternating(["new", "old"]),  # ABBA: drift hits both alike
                             lambda v, round_: run_launch(v, sources[v], setup, args, work, round_),
                             lambda v, round_, r: print(
                                 f"{round_tag(round_, args.rounds)} {v}: {median(r['seconds_per_step'][args.warmup:]):.3f} "
                                 f"s/step (launch {r['launch_wall_seconds']:.0f} s)", flush=True))
    summary, text = summarise(args, results)
    m = setup["model"]
    print()
    print(f"DDP, {args.processes} CPU processes x {args.threads} thread(s), batch {args.batch_size} pairs per process, "
          f"{args.steps} steps per run ({args.warmup} warm-up discarded), {args.rounds} round(s), model "
          f"{m['params_total'] / 1e6:.2f}M params (hidden {m['hidden']}, {m['layers']} layers)")
    print("values: median (min–max over rounds)")
    print(text)
    print(f"\nper-step training loss, new vs old: max |difference| {summary['max_abs_loss_difference']:.2e}")
    path = write_result(args, "engines-", {"setup": setup, "imported_from": where, "working_tree": tree,
                                           "summary": summary, "raw": results, "table_markdown": text}, t0)
    print(f"\nwrote {path} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
