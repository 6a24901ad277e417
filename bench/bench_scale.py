#!/usr/bin/env python
"""Memory and speed of DPO at a >=100M-parameter scale: full fine-tuning, LoRA and QLoRA, dpokit and TRL.

One command (see bench/README.md, "Scale: full fine-tuning vs LoRA vs QLoRA"):

    python bench/bench_scale.py              # ~104M-parameter Llama, 3 interleaved rounds
    python bench/bench_scale.py --quick      # tiny model, 1 round: checks the harness (~2 min)

Systems (each run in its own child process, interleaved in rounds, same data and batches, AdamW lr 1e-5
constant without warm-up, float32, beta 0.1):

* ``dpokit-full``  ``dpokit.api.train_dpo``, full fine-tuning, reference model resident;
* ``dpokit-lora``  the same with ``lora_r=16, lora_alpha=32, lora_dropout=0.0`` (default targets: every linear
  layer of the decoder; the reference is the base with the adapter disabled);
* ``dpokit-qlora`` LoRA on a 4-bit (bitsandbytes NF4) base, ``load_in_4bit=True``;
* ``trl-full``     ``trl.DPOTrainer`` with a reference model (same weights);
* ``trl-lora``     ``DPOTrainer`` with ``peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
  target_modules="all-linear")`` and no reference model (TRL disables the adapter for the reference);
* ``trl-qlora``    the same on a 4-bit NF4 base (float32 compute);
* ``dpokit-lora-gc``, ``dpokit-full-gc`` (only when named in ``--systems``) ``dpokit-lora``/``dpokit-full`` with
  ``gradient_checkpointing=True``;
* ``trl-lora-gc`` (only when named) ``trl-lora`` with ``gradient_checkpointing=True``, TRL's own default;
* ``dpokit-full-mmap``, ``dpokit-lora-mmap`` (only when named) ``dpokit-full``/``dpokit-lora`` with
  ``return_freed_memory=True`` (freed activations returned to the system at once; dpokit.runtime.memory).

Measured per run: seconds per step (dpokit: the trainer's ``seconds_per_step`` in ``metrics.jsonl``; TRL: the
time between consecutive ``on_step_end`` callbacks), median over the steps after ``--warmup``; peak RSS of the
child (``ru_maxrss``; for dpokit read before the end-of-run checkpoint, which is skipped). Reported: median
(min-max) over rounds, and per-round ratios summarised the same way. The children inherit the environment, so
``LD_PRELOAD=.../libjemalloc.so.2 python bench/bench_scale.py`` measures every system with jemalloc. By default
(``--malloc as-shipped``) dpokit's children run on the allocator the ``dpokit`` command would choose (mimalloc
from the cmeel-mimalloc wheel, or jemalloc: dpokit.runtime.memory), TRL's on the environment's, as each ships;
``--malloc inherit`` runs every child on the environment's. The allocator of each system is recorded.
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
from _scale_children import (DEFAULT_SYSTEMS, LORA, LR, SYSTEMS, child_dpokit, child_trl, dpokit_lora_fields,
                             tree_state)
from _setup import add_malloc_option, add_shape_options, allocators, build_everything, child_environment

HERE = Path(__file__).resolve().parent

# (numerator, denominator, kind, target): kind "mem" = peak RSS ratio, "speed" = throughput ratio (num / den)
RATIOS = [
    ("dpokit-lora", "dpokit-full", "mem", ("<=", 0.5)),
    ("dpokit-qlora", "dpokit-full", "mem", ("<=", 0.5)),
    ("dpokit-lora-gc", "dpokit-full", "mem", ("<=", 0.5)),
    ("dpokit-lora-mmap", "dpokit-full-mmap", "mem", ("<=", 0.5)),
    ("dpokit-lora-gc", "dpokit-full-gc", "mem", ("<=", 0.5)),
    ("dpokit-lora-gc", "trl-lora-gc", "speed", (">=", 2.0)),
    ("dpokit-lora-gc", "trl-lora-gc", "mem", ("<=", 0.6)),
    ("dpokit-lora", "trl-lora", "speed", (">=", 2.0)),
    ("dpokit-lora", "trl-lora", "mem", ("<=", 0.6)),
    ("dpokit-lora-mmap", "trl-lora", "speed", (">=", 2.0)),
    ("dpokit-lora-mmap", "trl-lora", "mem", ("<=", 0.6)),
    ("dpokit-lora-mmap", "dpokit-lora", "speed", None),
    ("dpokit-lora-mmap", "dpokit-lora", "mem", None),
    ("dpokit-qlora", "trl-qlora", "speed", None),
    ("dpokit-qlora", "trl-qlora", "mem", None),
    ("dpokit-full", "trl-full", "speed", None),
    ("dpokit-full", "trl-full", "mem", None),
    ("trl-lora", "trl-full", "mem", None),
]


def run_child(spec: dict, work: Path, name: str, round_: int, malloc: str) -> dict:
    spec_path = work / f"spec_{name}_{round_}.json"
    out_path = work / f"result_{name}_{round_}.json"
    spec = dict(spec, result=str(out_path), output=str(work / f"run_{name}_{round_}"))
    shutil.rmtree(spec["output"], ignore_errors=True)  # left by an interrupted earlier run in the same --workdir
    spec_path.write_text(json.dumps(spec))
    env = child_environment(name, malloc, spec["threads"], work)
    log = work / f"log_{name}_{round_}.txt"
    started = time.perf_counter()
    with log.open("w") as handle:
        proc = subprocess.run([sys.executable, __file__, "--child", str(spec_path)], stdout=handle,
                              stderr=subprocess.STDOUT, env=env)
    shutil.rmtree(spec["output"], ignore_errors=True)
    if proc.returncode != 0 or not out_path.exists():
        return {"failed": True, "returncode": proc.returncode, "log_tail": log.read_text()[-6000:],
                "child_wall_seconds": time.perf_counter() - started}
    result = json.loads(out_path.read_text())
    result["child_wall_seconds"] = time.perf_counter() - started
    return result


def summarise(results: dict, warmup: int) -> dict:
    systems = {}
    for name, runs in results.items():
        ok = [r for r in runs if not r.get("failed")]
        per_round = []
        for r in ok:
            sec = r["seconds_per_step"][warmup:]
            tok = r["tokens_per_step"][warmup:]
            per_round.append({"seconds_per_step": _med(sec), "tokens_per_second": sum(tok) / sum(sec),
                              "tokens_per_step": tok, "peak_rss_mib": r["peak_rss_mib"],
                              "peak_minus_import_mib": r["peak_rss_mib"] - r["rss_after_import_mib"],
                              "trainable_params": r.get("trainable_params")})
        systems[name] = {"per_round": per_round, "failed_rounds": len(runs) - len(ok)}
    ratios = []
    for num, den, kind, target in RATIOS:
        if num not in systems or den not in systems:
            continue
        a, b = results[num], results[den]
        values = []
        for ra, rb in zip(a, b):  # per round: the two runs of the same round
            if ra.get("failed") or rb.get("failed"):
                continue
            if kind == "mem":
                values.append(ra["peak_rss_mib"] / rb["peak_rss_mib"])
            else:
                ta = sum(ra["tokens_per_step"][warmup:]) / sum(ra["seconds_per_step"][warmup:])
                tb = sum(rb["tokens_per_step"][warmup:]) / sum(rb["seconds_per_step"][warmup:])
                values.append(ta / tb)
        same = None
        if kind == "speed":
            same = all(ra["tokens_per_step"] == rb["tokens_per_step"] for ra, rb in zip(a, b)
                       if not ra.get("failed") and not rb.get("failed"))
        entry = {"num": num, "den": den, "kind": kind, "values": values, "same_batches": same}
        if target and values:
            op, bound = target
            entry["target"] = f"{op} {bound}"
            worst = max(values) if op == "<=" else min(values)
            med = _med(values)
            entry["met_median"] = med <= bound if op == "<=" else med >= bound
            entry["met_every_round"] = worst <= bound if op == "<=" else worst >= bound
        ratios.append(entry)
    return {"systems": systems, "ratios": ratios}


def table(summary: dict) -> str:
    lines = ["| system | trainable params | s/step | tokens/s | peak RSS MiB | peak RSS above imports MiB | rounds ok |",
             "|---|---|---|---|---|---|---|"]
    for name, s in summary["systems"].items():
        pr = s["per_round"]
        n = len(pr) + s["failed_rounds"]
        trainable = pr[0]["trainable_params"] if pr and pr[0]["trainable_params"] else None
        lines.append(
            f"| {name} | {f'{trainable / 1e6:.2f}M' if trainable else '–'} "
            f"| {_spread([r['seconds_per_step'] for r in pr])} "
            f"| {_spread([r['tokens_per_second'] for r in pr], '{:.0f}')} "
            f"| {_spread([r['peak_rss_mib'] for r in pr], '{:.0f}')} "
            f"| {_spread([r['peak_minus_import_mib'] for r in pr], '{:.0f}')} | {len(pr)}/{n} |")
    lines += ["", "| ratio | median (min–max over rounds) | target | met (median / every round) |", "|---|---|---|---|"]
    for r in summary["ratios"]:
        what = "peak RSS" if r["kind"] == "mem" else "throughput"
        label = f"{what}: {r['num']} / {r['den']}"
        if r["kind"] == "speed" and r["same_batches"] is False:
            label += " (tokens per step differ!)"
        met = "–"
        if "met_median" in r:
            met = f"{'yes' if r['met_median'] else 'NO'} / {'yes' if r['met_every_round'] else 'NO'}"
        lines.append(f"| {label} | {_spread(r['values'], '{:.2f}')} | {r.get('target', '–')} | {met} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--steps", type=int, default=4, help="training steps per run (default 4)")
    parser.add_argument("--warmup", type=int, default=1, help="steps discarded at the start of each run (default 1)")
    parser.add_argument("--batch-size", type=int, default=4, help="preference pairs per step (default 4)")
    parser.add_argument("--max-length", type=int, default=256)
    add_shape_options(parser, prompt_len=64, response_len=48, hidden=768, layers=12, heads=12, intermediate=2304)
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every run (default 2)")
    parser.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                        help=f"comma-separated subset of: {', '.join(SYSTEMS)} (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="keep the model, data and logs here (default: a temporary directory)")
    parser.add_argument("--out", default=str(HERE / "results"), help="directory for the JSON result")
    add_malloc_option(parser)
    parser.add_argument("--quick", action="store_true",
                        help="tiny check of the harness: 1 round, 3 steps, hidden 64, 2 layers")
    args = parser.parse_args()

    if args.child:
        spec = json.loads(Path(args.child).read_text())
        result = (child_dpokit if spec["kind"] == "dpokit" else child_trl)(spec)
        Path(spec["result"]).write_text(json.dumps(result))
        return

    if args.quick:
        args.rounds, args.steps, args.warmup = 1, 3, 1
        args.hidden, args.layers, args.heads, args.intermediate = 64, 2, 2, 128
        args.prompt_len, args.response_len, args.max_length = 32, 16, 128
    names = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown:
        parser.error(f"unknown systems {unknown}; choose from {list(SYSTEMS)}")
    fields = dpokit_lora_fields()
    skipped = {}
    for n in names:
        kind, opts = SYSTEMS[n]
        missing = [k for k in opts if kind == "dpokit" and k not in fields]
        if missing:
            skipped[n] = f"dpokit.TrainConfig has no field(s) {missing}"
    if skipped:
        for n, why in skipped.items():
            print(f"skipping {n}: {why}", flush=True)
        names = [n for n in names if n not in skipped]
    args.pairs = args.batch_size * args.steps  # one epoch covers the run: every step sees new pairs

    tree_before = tree_state(HERE.parent)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="dpokit_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"building tokenizer, model and data in {work} ...", flush=True)
    setup = build_everything(args, work)
    m = setup["model"]
    print(f"model: {m['params_total'] / 1e6:.2f}M parameters (hidden {m['hidden']}, {m['layers']} layers, "
          f"MLP {m['intermediate']}, vocab {m['vocab']}); data: {json.dumps(setup['data_stats'])}", flush=True)

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
            if r.get("failed"):
                print(f"round {round_ + 1}/{args.rounds} {name:13s} FAILED (exit {r['returncode']}); log tail:\n"
                      f"{r['log_tail'][-3000:]}", flush=True)
                continue
            sec = r["seconds_per_step"][args.warmup:]
            print(f"round {round_ + 1}/{args.rounds} {name:13s} {_med(sec):7.3f} s/step  "
                  f"{sum(r['tokens_per_step'][args.warmup:]) / sum(sec):7.0f} tokens/s  "
                  f"peak RSS {r['peak_rss_mib']:6.0f} MiB  (child {r['child_wall_seconds']:.0f} s)", flush=True)

    tree_after = tree_state(HERE.parent)
    summary = summarise(results, args.warmup)
    text = table(summary)
    print()
    print(f"DPO at scale: model {m['params_total'] / 1e6:.1f}M params (hidden {m['hidden']}, {m['layers']} layers, "
          f"MLP {m['intermediate']}, vocab {m['vocab']}), batch {args.batch_size} pairs, prompts ~{args.prompt_len} "
          f"tokens, responses ~{args.response_len}, float32, AdamW lr {LR:g} constant, LoRA r={LORA['r']} "
          f"alpha={LORA['alpha']} dropout={LORA['dropout']} on all linear layers, {args.threads} threads, "
          f"{args.steps} steps per run ({args.warmup} warm-up discarded), {args.rounds} round(s), allocators: "
          + "; ".join(f"{n}: {a}" for n, a in allocators(names, args.malloc).items()))
    print("values: median (min–max over rounds)")
    print(text)
    if skipped:
        print("\nnot run: " + "; ".join(f"{n} ({why})" for n, why in skipped.items()))
    if tree_before != tree_after:
        print("\nWARNING: src/ changed while the benchmark ran (different runs may have measured different code): "
              f"{tree_before['src_state_sha1'][:10]} -> {tree_after['src_state_sha1'][:10]}")
    failed = {n: sum(1 for r in rs if r.get("failed")) for n, rs in results.items()}
    failed = {n: k for n, k in failed.items() if k}
    if failed:
        print("\nfailed runs: " + ", ".join(f"{n} x{k}" for n, k in failed.items()) + " (log tails in the JSON)")

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"scale-{stamp}{'-quick' if args.quick else ''}.json"
    payload = {"args": vars(args), "setup": setup, "summary": summary, "skipped": skipped, "raw": results,
               "dpokit_tree": {"before": tree_before, "after": tree_after},
               "table_markdown": text, "wall_seconds": time.perf_counter() - t0,
               "machine": {"platform": platform.platform(), "python": platform.python_version(),
                           "cpus": os.cpu_count(), "versions": _versions(),
                           "allocators": allocators(names, args.malloc)}}
    path.write_text(json.dumps(payload, indent=1, default=str))
    print(f"\nwrote {path} ({time.perf_counter() - t0:.0f} s)")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    if failed:
        sys.exit(1)


def _versions() -> dict:
    out = {}
    for mod in ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "dpokit"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            out[mod] = None
    return out


if __name__ == "__main__":
    main()
