#!/usr/bin/env python
"""Speed and memory of dpokit's DPO training step against TRL's DPOTrainer, on the same model and data.

One command does everything (see bench/README.md):

    python bench/bench_vs_trl.py                 # default shape, 3 interleaved rounds
    python bench/bench_vs_trl.py --quick         # tiny shape, seconds: checks that the harness works

What it does:

1. Builds, in a temporary work directory, a byte-level BPE tokenizer (vocabulary 8192, trained on generated
   text from a synthetic Zipf-distributed word list), a randomly initialised ``LlamaForCausalLM`` and a
   preference data set whose prompts and responses are generated *by token count* (default prompts ~200
   tokens, responses ~120, each uniform within ±30%), written as JSONL (read by dpokit) and given to TRL as an
   in-memory ``datasets.Dataset`` holding the same rows in the order dpokit's first epoch visits them, with
   TRL's sampler set to sequential, so both train on the same batches step for step.
2. Runs every system in its own child process (so peak RSS is per run), in interleaved rounds
   ``[dpokit, TRL, dpokit precompute, TRL precompute, dpokit ablations...] x rounds``:
   * dpokit through its own trainer (``dpokit.api.train_dpo``), seconds per step read from the trainer's
     ``metrics.jsonl`` rows; TRL through ``DPOTrainer.train()``, seconds per step from a TrainerCallback (time
     between consecutive ``on_step_end``, i.e. the whole step including data loading and logging).
   * Same batch size, max length, float32, AdamW, torch threads, learning rate; TRL with gradient
     checkpointing off and ``bf16=False``. The first ``--warmup`` steps of every run are discarded.
   * Tokens per step = prompt + response tokens of every sequence, the prompt counted once per response (what
     dpokit's trainer logs, and exactly the non-padding tokens TRL's batch holds).
   * Reference log-prob precomputation is timed separately and is not part of any step time.
3. Measures the machine's float32 matrix-multiply rate (before and after the rounds, with the same thread
   count) and reports dpokit's achieved FLOP/s as a fraction of it (an estimate; formula in the README).
4. Checks exactness on a batch of the benchmark data: log-probs, DPO losses and the gradients of every
   parameter with every optimisation on (packed layout, chunked response-only logits, forward groups) against every
   optimisation off (plain padded layout, full logits).
5. Prints a markdown table and writes everything to ``bench/results/<timestamp>.json``.

dpokit's children run on the allocator the ``dpokit`` command would choose, TRL's on the environment's
(``--malloc as-shipped``, the default; ``--malloc inherit``: every child on the environment's); recorded in the JSON.

This file holds the command line and the rounds (it is also what every child process runs, with ``--child``);
the rest lives beside it: ``_setup.py`` (tokenizer, model, data), ``_children.py`` (the systems and the dpokit
and TRL runs), ``_report.py`` (FLOP estimates, matmul rate, summary, table), ``_exactness.py`` (the exactness
check).
"""

from __future__ import annotations

import time
from pathlib import Path

from _children import CHILDREN, DEFAULT_SYSTEMS, SYSTEMS
from _exactness import exactness
from _harness import apply_quick, chosen_systems, harness_parser, interleave, matmul_gflops, run_line, write_result
from _report import summarise, table
from _setup import (add_malloc_option, add_shape_options, allocators, build_inputs, child_spec, serve_child,
                    system_runner, workdir)


def parse_args():
    parser = harness_parser(__doc__, rounds=3, steps=6, warmup=2, batch_size=8, max_length=512, threads=2,
                            systems=SYSTEMS, default_systems=DEFAULT_SYSTEMS,
                            quick="tiny validation run: 1 round, 3 steps, 16 pairs of short sequences, hidden 64, 2 layers")
    parser.add_argument("--pairs", type=int, default=64, help="preference pairs in the data set (default 64)")
    add_shape_options(parser)
    parser.add_argument("--matmul-size", type=int, default=1024)
    parser.add_argument("--no-exactness", action="store_true", help="skip the exactness check")
    add_malloc_option(parser)
    args = parser.parse_args()
    if args.child:
        return args, None
    apply_quick(args, rounds=1, steps=3, warmup=1, pairs=16, batch_size=4, prompt_len=40, response_len=24, hidden=64,
                layers=2, heads=2, max_length=128, matmul_size=512)
    names = chosen_systems(parser, args, SYSTEMS)
    args.pairs = max(args.pairs, args.batch_size * args.steps)  # one epoch covers the run: every step sees new pairs
    return args, names


def measure(args, names: list[str], work: Path) -> dict:
    """Build the inputs, run the rounds between two matmul measurements, check exactness."""
    setup = build_inputs(args, work)
    gflops = [matmul_gflops(args.threads, args.matmul_size)]
    print(f"float32 matmul: {gflops[0]:.1f} GFLOP/s with {args.threads} threads", flush=True)
    print("allocators: " + "; ".join(f"{n}: {a}" for n, a in allocators(names, args.malloc).items()), flush=True)
    run = system_runner(__file__, SYSTEMS, child_spec(setup, args), args, work)
    results = interleave(args.rounds, names, run, lambda name, round_, r: print(
        run_line(round_, args.rounds, name, r, args.warmup), flush=True))
    gflops.append(matmul_gflops(args.threads, args.matmul_size))
    exact = None
    if not args.no_exactness:
        print("exactness check (every optimisation on vs off) ...", flush=True)
        exact = exactness(setup, args)
    return {"setup": setup, "matmul_gflops": gflops, "exactness": exact, "raw": results}


def report(args, measured: dict) -> str:
    """Print the table and the exactness check; return the table."""
    m, exact, gflops = measured["setup"]["model"], measured["exactness"], measured["matmul_gflops"]
    text = table(measured["summary"], gflops)
    print()
    print(f"dpokit vs TRL {_trl_version()}: batch {args.batch_size} pairs, max_length {args.max_length}, float32, "
          f"{args.threads} threads, {args.steps} steps per run ({args.warmup} warm-up discarded), {args.rounds} rounds; "
          f"model {m['params_total'] / 1e6:.2f}M params (hidden {m['hidden']}, {m['layers']} layers, vocab {m['vocab']})")
    print("values: median (min–max over rounds)")
    print(text)
    if exact:
        print()
        print(f"exactness on {exact['batch']['pairs']} pairs ({exact['batch']['scored_tokens']} scored tokens), "
              f"packed+chunked+groups vs plain+full, float32: {'PASS' if exact['pass'] else 'FAIL'} (allclose rtol=atol=1e-5)")
        for key in ("token_logps", "policy_logps", "reference_logps", "losses", "loss", "grads_all_params"):
            v = exact[key]
            print(f"  {key:16s} max abs diff {v['max_abs']:.2e}  max |diff|/max |value| {v['max_abs_over_max_value']:.2e}"
                  f"  (max |value| {v['max_value']:.3g})  allclose {v['allclose_1e-5']}")
        worst_name, worst = exact["grads_worst_param_by_rel_to_max"]
        print(f"  worst gradient tensor {worst_name}: max abs diff {worst['max_abs']:.2e}, "
              f"relative to its max |value| {worst['max_abs_over_max_value']:.2e}; "
              f"every gradient tensor allclose: {exact['grads_all_params_allclose_1e-5']}")
    return text


def main() -> None:
    args, names = parse_args()
    if args.child:
        return serve_child(args.child, CHILDREN)
    t0 = time.perf_counter()
    with workdir(args, "dpokit_bench_") as work:
        measured = measure(args, names, work)
    measured["summary"] = summarise(measured["raw"], measured["setup"], args, measured["matmul_gflops"])
    text = report(args, measured)
    path = write_result(args, "", {**measured, "table_markdown": text}, t0,
                        {"allocators": allocators(names, args.malloc)})
    print(f"\nwrote {path} ({time.perf_counter() - t0:.0f} s)")


def _trl_version() -> str:
    try:
        import trl

        return trl.__version__
    except ImportError:
        return "?"


if __name__ == "__main__":
    main()
