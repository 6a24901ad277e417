#!/usr/bin/env python
"""What the size of oneDNN's kernel cache costs a bfloat16 run on a CPU: ``dpokit dpo --dtype bfloat16`` as whole
processes, with ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` set to each of ``--capacities``, interleaved over ``--rounds``.

oneDNN runs torch's bfloat16 matmuls on a CPU and keeps up to 1,024 compiled kernels (its default), one per
matmul shape. Pairs of varied lengths bring new shapes every step, so the cache, and the process, grows through a
run; the `dpokit` command sets 64 unless the user set a value (dpokit.runtime.memory.cap_onednn_cache), so
``--capacities 1024,64`` compares oneDNN's default with dpokit's.

    python bench/bench_onednn_cache.py                                   # chat shape, full, 30 steps, 3 rounds
    python bench/bench_onednn_cache.py --mode lora --capacities 1024,64,256
    python bench/bench_onednn_cache.py --quick                           # tiny model, 3 steps: checks that it works

The fixture and command line are bench_e2e.py's (``--shape``, ``--mode``, ``--pairs``, 2 threads, batch 8).
Reported per capacity: peak RSS of the whole process, its wall seconds and the median logged seconds per step
after the first two, each as median (min–max) over the rounds. The JSON goes to
bench/results/onednn-cache-<timestamp>.json.
"""

from __future__ import annotations

import time
from pathlib import Path

from _harness import alternating, apply_quick, harness_parser, interleave, markdown, median, spread, write_result
from _setup import build_inputs, quiet_environment, workdir
from bench_e2e import MODES, SHAPES, TINY, add_fixture_options, dpokit_process

CACHE = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"


def parse_args():
    parser = harness_parser(__doc__, rounds=3, steps=30, batch_size=8, threads=2, child=None,
                            quick="tiny check that it works: 1 round, 3 steps, batch 2, 8 pairs, hidden 64, 2 layers, "
                                  "vocabulary 1024")
    parser.add_argument("--shape", choices=SHAPES, default="chat")
    parser.add_argument("--mode", choices=MODES, default="full")
    parser.add_argument("--pairs", type=int, default=128, help="preference pairs in the fixture (default 128)")
    parser.add_argument("--capacities", default="1024,64",
                        help="comma-separated values of ONEDNN_PRIMITIVE_CACHE_CAPACITY (default 1024,64)")
    parser.add_argument("--lr", type=float, default=1e-6)
    add_fixture_options(parser)
    args = parser.parse_args()
    apply_quick(args, rounds=1, steps=3, pairs=8, **TINY)
    args.prompt_len, args.response_len, args.max_length = SHAPES[args.shape]
    args.capacities = [c.strip() for c in args.capacities.split(",") if c.strip()]
    args.trl_defaults = False  # read by bench_e2e.command for TRL's runs only
    return args


def runner(setup: dict, args, work: Path):
    """run(capacity, round_): one whole bfloat16 `dpokit dpo` process with that cache size."""

    def run(capacity: str, round_: int) -> dict:
        env = quiet_environment(threads=args.threads, **{CACHE: capacity})
        measured, rows = dpokit_process("dpokit-bf16", args.mode, args.steps, setup, args, work / f"run_{capacity}",
                                        env, work / f"log_{capacity}.txt", f"{CACHE}={capacity}")
        steps = [r["seconds_per_step"] for r in rows]
        return {"peak_rss_mib": measured["peak_rss_mib"], "whole_process_seconds": measured["seconds"],
                "seconds_per_step": median(steps[2:] or steps)}

    return run

def main() -> None:
    args = parse_args()
    t0 = time.perf_counter()
    with workdir(args, "dpokit_onednn_cache_") as work:
        setup = build_inputs(args, work)
        results = interleave(args.rounds, alternating(args.capacities), runner(setup, args, work),
                             lambda c, r, x: print(f"round {r + 1}/{args.rounds} {CACHE}={c:5s} peak "
                                                   f"{x['peak_rss_mib']:6.0f} MiB, {x['whole_process_seconds']:5.1f} s, "
                                                   f"{x['seconds_per_step']:.3f} s/step", flush=True))
    rows = [[capacity, spread([x["peak_rss_mib"] for x in runs], "{:.0f}"),
             spread([x["whole_process_seconds"] for x in runs], "{:.1f}"),
             spread([x["seconds_per_step"] for x in runs])] for capacity, runs in results.items()]
    text = markdown([CACHE, "peak RSS MiB", "whole process s", "s/step (median logged, after 2)"], rows)
    print(f"\n{args.shape} shape, {args.mode}, --dtype bfloat16, {args.steps} steps, {args.threads} threads, "
          f"{args.rounds} round(s): median (min–max)\n{text}")
    path = write_result(args, "onednn-cache-", {"setup": setup, "results": results, "table_markdown": text}, t0,
                        {"threads": args.threads})
    print(f"wrote {path} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
