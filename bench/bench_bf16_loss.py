#!/usr/bin/env python
"""bfloat16 against float32 over a longer run: ``dpokit dpo`` trained twice on the same fixture, seed and settings,
once with ``--dtype float32`` and once with ``--dtype bfloat16``, and the training losses of their metrics.jsonl
compared step by step.

    python bench/bench_bf16_loss.py                 # current shape, full fine-tuning, 100 steps, lr 1e-5
    python bench/bench_bf16_loss.py --quick         # tiny model, 5 steps: checks that it works

Each run is bench_e2e.py's dpokit run (its command line, settings and thread count, a whole process) on
bench_e2e.py's fixture: the random Llama and ``--pairs`` pairs (default 80, the fixture of bench_e2e.py's default
steps 2,10) of ``--shape`` (default ``current``: prompts ~200 tokens, responses ~120, max length 512), batch 8, so
100 steps are 10 epochs over the same pairs. ``--mode``: ``full`` (default), ``precompute`` or ``lora``, as in
bench_e2e.py. The learning rate is 1e-5 by default, ten times bench_e2e.py's, so that the loss moves further from
log 2 in 100 steps. Reported: the absolute difference of the two losses at every step (max and mean over the
steps), each run's first and final loss, and, as a side note (one run each, not interleaved), each run's median
logged seconds per step and whole-process seconds. The JSON (bench/results/bf16-loss-<timestamp>.json) holds every
step's two losses.
"""

from __future__ import annotations

import time
from pathlib import Path

from _harness import apply_quick, harness_parser, median, write_result
from _setup import build_inputs, quiet_environment, workdir
from bench_e2e import MODES, SHAPES, TINY, add_fixture_options, dpokit_process

DTYPES = {"float32": "dpokit", "bfloat16": "dpokit-bf16"}  # dtype -> bench_e2e.py's system of that precision


def parse_args():
    parser = harness_parser(__doc__, rounds=None, steps=100, batch_size=8, threads=2, child=None,
                            quick="tiny check that it works: 5 steps, batch 2, 4 pairs, hidden 64, 2 layers, "
                                  "vocabulary 1024")
    parser.add_argument("--shape", choices=SHAPES, default="current")
    parser.add_argument("--mode", choices=MODES, default="full")
    parser.add_argument("--pairs", type=int, default=80, help="preference pairs in the fixture (default 80)")
    parser.add_argument("--lr", type=float, default=1e-5)
    add_fixture_options(parser)
    args = parser.parse_args()
    apply_quick(args, steps=5, pairs=4, **TINY)
    args.prompt_len, args.response_len, args.max_length = SHAPES[args.shape]
    args.trl_defaults = False  # read by bench_e2e.command for TRL's runs only
    return args


def train(dtype: str, setup: dict, args, work: Path) -> dict:
    """One whole `dpokit dpo` process in `dtype`: its per-step losses and seconds, and its whole-process time."""
    measured, rows = dpokit_process(DTYPES[dtype], args.mode, args.steps, setup, args, work / f"run_{dtype}",
                                    quiet_environment(threads=args.threads), work / f"log_{dtype}.txt",
                                    f"dpokit --dtype {dtype}")
    return {"loss": [r["loss"] for r in rows], "seconds_per_step": [r["seconds_per_step"] for r in rows],
            "whole_process_seconds": measured["seconds"], "peak_rss_mib": measured["peak_rss_mib"]}

def main() -> None:
    args = parse_args()
    t0 = time.perf_counter()
    with workdir(args, "dpokit_bf16_loss_") as work:
        setup = build_inputs(args, work)
        runs = {}
        for dtype in DTYPES:
            runs[dtype] = train(dtype, setup, args, work)
            print(f"{dtype:9s} {len(runs[dtype]['loss'])} steps, loss {runs[dtype]['loss'][0]:.6f} -> "
                  f"{runs[dtype]['loss'][-1]:.6f}, {median(runs[dtype]['seconds_per_step']):.3f} s/step (median "
                  f"logged), whole process {runs[dtype]['whole_process_seconds']:.1f} s", flush=True)
    f32, bf16 = runs["float32"]["loss"], runs["bfloat16"]["loss"]
    diff = [abs(a - b) for a, b in zip(f32, bf16)]
    comparison = {"steps": len(diff), "max_abs_loss_difference": max(diff),
                  "mean_abs_loss_difference": sum(diff) / len(diff),
                  "final_loss": {"float32": f32[-1], "bfloat16": bf16[-1]},
                  "first_loss": {"float32": f32[0], "bfloat16": bf16[0]}}
    print(f"\n|loss bf16 - loss f32| over {len(diff)} steps: max {comparison['max_abs_loss_difference']:.6f}, mean "
          f"{comparison['mean_abs_loss_difference']:.6f}; final loss float32 {f32[-1]:.6f}, bfloat16 {bf16[-1]:.6f}")
    path = write_result(args, "bf16-loss-", {"setup": setup, "comparison": comparison, "runs": runs}, t0,
                        {"threads": args.threads})
    print(f"wrote {path} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
