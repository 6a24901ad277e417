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

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _report import _med, _spread
from _scale_children import tree_state
from _setup import add_shape_options, build_everything, free_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _env(src: Path, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(src), HF_HUB_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1",
               PYTHONWARNINGS="ignore", TQDM_DISABLE="1")
    env.pop("ACCELERATE_USE_CPU", None)
    return env


def _imported_from(src: Path, threads: int) -> str:
    out = subprocess.run([sys.executable, "-c", "import dpokit; print(dpokit.__file__)"], env=_env(src, threads),
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def run_launch(version: str, src: Path, setup: dict, args, work: Path, round_: int) -> dict:
    output = work / f"run_{version}_{round_}"
    shutil.rmtree(output, ignore_errors=True)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(args.processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "dpokit.cli.main",
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", default="a932e1e", help="commit of the hand-written all-reduce loop (default a932e1e)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per run (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="leading steps discarded per run (default 2)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per process (default 1)")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per process per step (default 4)")
    parser.add_argument("--max-length", type=int, default=256)
    add_shape_options(parser, prompt_len=64, response_len=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=int, default=900, help="seconds allowed per launch")
    parser.add_argument("--workdir", help="keep the model, data and logs here (default: a temporary directory)")
    parser.add_argument("--out", default=str(HERE / "results"), help="directory for the JSON result")
    parser.add_argument("--quick", action="store_true", help="1 round, 3 steps, hidden 64, 2 layers")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps, args.warmup = 1, 3, 1
        args.hidden, args.layers, args.heads, args.max_length = 64, 2, 2, 128
        args.prompt_len, args.response_len = 32, 16
    args.pairs = args.batch_size * args.processes * args.steps

    t0 = time.perf_counter()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="dpokit_engines_"))
    work.mkdir(parents=True, exist_ok=True)
    old_tree = Path(tempfile.mkdtemp(prefix="dpokit_old_")) / "tree"
    subprocess.run(["git", "worktree", "add", "--detach", str(old_tree), args.old], cwd=REPO, check=True,
                   capture_output=True)
    try:
        sources = {"new": REPO / "src", "old": old_tree / "src"}
        where = {v: _imported_from(s, args.threads) for v, s in sources.items()}
        for v, s in sources.items():
            if not Path(where[v]).resolve().is_relative_to(s.resolve()):
                raise SystemExit(f"{v}: dpokit imported from {where[v]}, not from {s}")
        print(f"new: {where['new']}\nold: {where['old']} (commit {args.old})", flush=True)
        tree = tree_state(REPO)
        print(f"building tokenizer, model and data in {work} ...", flush=True)
        setup = build_everything(args, work)
        m = setup["model"]
        print(f"model: {m['params_total'] / 1e6:.2f}M parameters (hidden {m['hidden']}, {m['layers']} layers); "
              f"data: {json.dumps(setup['data_stats'])}", flush=True)
        results: dict[str, list] = {"new": [], "old": []}
        for round_ in range(args.rounds):
            order = ["new", "old"] if round_ % 2 == 0 else ["old", "new"]  # ABBA: drift hits both alike
            for version in order:
                r = run_launch(version, sources[version], setup, args, work, round_)
                results[version].append(r)
                print(f"round {round_ + 1}/{args.rounds} {version}: {_med(r['seconds_per_step'][args.warmup:]):.3f} "
                      f"s/step (launch {r['launch_wall_seconds']:.0f} s)", flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(old_tree)], cwd=REPO, capture_output=True)
        shutil.rmtree(old_tree.parent, ignore_errors=True)
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    w = args.warmup
    per_round = {v: [_med(r["seconds_per_step"][w:]) for r in rs] for v, rs in results.items()}
    walls = {v: [r["launch_wall_seconds"] for r in rs] for v, rs in results.items()}
    ratios = [a / b for a, b in zip(per_round["new"], per_round["old"])]
    wall_ratios = [a / b for a, b in zip(walls["new"], walls["old"])]
    loss_diff = max(abs(a - b) for rn, ro in zip(results["new"], results["old"])
                    for a, b in zip(rn["loss"], ro["loss"]))
    lines = ["| version | s/step | launch wall s |", "|---|---|---|",
             f"| new: engine DDP (working tree) | {_spread(per_round['new'])} | {_spread(walls['new'], '{:.1f}')} |",
             f"| old: hand-written all-reduce ({args.old}) | {_spread(per_round['old'])} | "
             f"{_spread(walls['old'], '{:.1f}')} |",
             "", "| ratio new / old (per round) | median (min–max) |", "|---|---|",
             f"| s/step | {_spread(ratios)} |", f"| launch wall time | {_spread(wall_ratios)} |"]
    text = "\n".join(lines)
    print()
    print(f"DDP, {args.processes} CPU processes x {args.threads} thread(s), batch {args.batch_size} pairs per process, "
          f"{args.steps} steps per run ({w} warm-up discarded), {args.rounds} round(s), model "
          f"{m['params_total'] / 1e6:.2f}M params (hidden {m['hidden']}, {m['layers']} layers)")
    print("values: median (min–max over rounds)")
    print(text)
    print(f"\nper-step training loss, new vs old: max |difference| {loss_diff:.2e}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"engines-{stamp}{'-quick' if args.quick else ''}.json"
    payload = {"args": vars(args), "setup": setup, "imported_from": where, "working_tree": tree,
               "summary": {"seconds_per_step": per_round, "launch_wall_seconds": walls, "ratio_new_over_old": ratios,
                           "wall_ratio_new_over_old": wall_ratios, "max_abs_loss_difference": loss_diff},
               "raw": results, "table_markdown": text, "wall_seconds": time.perf_counter() - t0,
               "machine": {"platform": platform.platform(), "python": platform.python_version(),
                           "cpus": os.cpu_count()}}
    path.write_text(json.dumps(payload, indent=1, default=str))
    print(f"\nwrote {path} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
