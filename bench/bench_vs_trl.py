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

from _children import DEFAULT_SYSTEMS, SYSTEMS, child_dpokit, child_trl
from _exactness import exactness
from _report import _med, matmul_gflops, summarise, table
from _setup import add_malloc_option, add_shape_options, allocators, build_everything, child_environment

HERE = Path(__file__).resolve().parent


def run_child(spec: dict, work: Path, name: str, round_: int, malloc: str) -> dict:
    spec_path = work / f"spec_{name}_{round_}.json"
    out_path = work / f"result_{name}_{round_}.json"
    spec = dict(spec, result=str(out_path), output=str(work / f"run_{name}_{round_}"))
    spec_path.write_text(json.dumps(spec))
    env = child_environment(name, malloc, spec["threads"], work)
    log = work / f"log_{name}_{round_}.txt"
    started = time.perf_counter()
    with log.open("w") as handle:
        proc = subprocess.run([sys.executable, __file__, "--child", str(spec_path)], stdout=handle,
                              stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0 or not out_path.exists():
        tail = log.read_text()[-4000:]
        raise SystemExit(f"{name} (round {round_}) failed with exit code {proc.returncode}; log tail:\n{tail}")
    result = json.loads(out_path.read_text())
    result["child_wall_seconds"] = time.perf_counter() - started
    shutil.rmtree(spec["output"], ignore_errors=True)
    return result


# --------------------------------------------------------------------------------------------------------------
# command line and rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--steps", type=int, default=6, help="training steps per run (default 6)")
    parser.add_argument("--warmup", type=int, default=2, help="steps discarded at the start of each run (default 2)")
    parser.add_argument("--batch-size", type=int, default=8, help="preference pairs per step (default 8)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--pairs", type=int, default=64, help="preference pairs in the data set (default 64)")
    add_shape_options(parser)
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every run (default 2)")
    parser.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                        help=f"comma-separated subset of: {', '.join(SYSTEMS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--matmul-size", type=int, default=1024)
    parser.add_argument("--no-exactness", action="store_true", help="skip the exactness check")
    parser.add_argument("--workdir", help="keep the model, data and logs here (default: a temporary directory)")
    parser.add_argument("--out", default=str(HERE / "results"), help="directory for the JSON result")
    add_malloc_option(parser)
    parser.add_argument("--quick", action="store_true",
                        help="tiny validation run: 1 round, 3 steps, 16 pairs of short sequences, hidden 64, 2 layers")
    args = parser.parse_args()

    if args.child:
        spec = json.loads(Path(args.child).read_text())
        result = (child_dpokit if spec["kind"] == "dpokit" else child_trl)(spec)
        Path(spec["result"]).write_text(json.dumps(result))
        return

    if args.quick:
        args.rounds, args.steps, args.warmup, args.pairs = 1, 3, 1, 16
        args.batch_size, args.prompt_len, args.response_len = 4, 40, 24
        args.hidden, args.layers, args.heads, args.max_length, args.matmul_size = 64, 2, 2, 128, 512
    names = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown:
        parser.error(f"unknown systems {unknown}; choose from {list(SYSTEMS)}")
    if args.pairs < args.batch_size * args.steps:
        args.pairs = args.batch_size * args.steps  # one epoch covers the run: every step sees new pairs

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="dpokit_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"building tokenizer, model and data in {work} ...", flush=True)
    setup = build_everything(args, work)
    m = setup["model"]
    print(f"model: {m['params_total'] / 1e6:.2f}M parameters ({m['params_decoder_layers'] / 1e6:.2f}M in decoder "
          f"layers, {m['params_lm_head'] / 1e6:.2f}M LM head, {m['params_embedding'] / 1e6:.2f}M embedding); "
          f"data: {json.dumps(setup['data_stats'])}", flush=True)

    gflops = [matmul_gflops(args.threads, args.matmul_size)]
    print(f"float32 matmul: {gflops[0]:.1f} GFLOP/s with {args.threads} threads", flush=True)
    print("allocators: " + "; ".join(f"{n}: {a}" for n, a in allocators(names, args.malloc).items()), flush=True)

    spec_base = {"model_dir": setup["model_dir"], "data": setup["data"], "data_trl": setup["data_trl"],
                 "batch_size": args.batch_size, "max_length": args.max_length,
                 "max_prompt_length": setup["max_prompt_length"], "steps": args.steps, "threads": args.threads,
                 "seed": args.seed}
    results: dict[str, list] = {n: [] for n in names}
    for round_ in range(args.rounds):
        for name in names:
            kind, options = SYSTEMS[name]
            r = run_child(dict(spec_base, kind=kind, options=options), work, name, round_, args.malloc)
            results[name].append(r)
            w = args.warmup
            sec = r["seconds_per_step"][w:]
            print(f"round {round_ + 1}/{args.rounds} {name:24s} {_med(sec):7.3f} s/step  "
                  f"{sum(r['tokens_per_step'][w:]) / sum(sec):8.0f} tokens/s  peak RSS {r['peak_rss_mib']:7.0f} MiB  "
                  f"(child {r['child_wall_seconds']:.0f} s)", flush=True)
    gflops.append(matmul_gflops(args.threads, args.matmul_size))

    exact = None
    if not args.no_exactness:
        print("exactness check (every optimisation on vs off) ...", flush=True)
        exact = exactness(setup, args)

    summary = summarise(results, setup, args, gflops)
    text = table(summary, gflops)
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

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stamp}{'-quick' if args.quick else ''}.json"
    payload = {
        "args": vars(args), "setup": setup, "matmul_gflops": gflops, "summary": summary, "exactness": exact,
        "raw": results, "table_markdown": text, "wall_seconds": time.perf_counter() - t0,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "versions": _versions(), "allocators": allocators(names, args.malloc)},
    }
    path.write_text(json.dumps(payload, indent=1, default=str))
    print(f"\nwrote {path} ({time.perf_counter() - t0:.0f} s)")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


def _trl_version() -> str:
    try:
        import trl

        return trl.__version__
    except ImportError:
        return "?"


def _versions() -> dict:
    out = {}
    for mod in ("torch", "transformers", "trl", "datasets", "tokenizers", "accelerate", "dpokit"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            out[mod] = None
    return out


if __name__ == "__main__":
    main()
