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

import sys
import time

from _harness import (apply_quick, chosen_systems, harness_parser, interleave, median, per_round, run_line, spread,
                      step_rates, tree_state, write_result)
from _scale_children import CHILDREN, DEFAULT_SYSTEMS, LORA, LR, SYSTEMS, dpokit_lora_fields
from _setup import (add_malloc_option, add_shape_options, allocators, build_inputs, child_spec, serve_child,
                    system_runner, workdir)

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


def _ratio(entry: dict, a: list, b: list, warmup: int) -> list[float]:
    """Per round (the two runs of the same round, both finished): peak RSS or throughput, num / den."""
    if entry["kind"] == "mem":
        return per_round(a, b, lambda x, y: x["peak_rss_mib"] / y["peak_rss_mib"], skip_failed=True)
    return per_round(a, b, lambda x, y: step_rates(x, warmup)[1] / step_rates(y, warmup)[1], skip_failed=True)


def _target(entry: dict, target) -> None:
    """Whether the median and every round meet `target` (op, bound)."""
    op, bound = target
    values = entry["values"]
    entry["target"] = f"{op} {bound}"
    worst = max(values) if op == "<=" else min(values)
    med = median(values)
    entry["met_median"] = med <= bound if op == "<=" else med >= bound
    entry["met_every_round"] = worst <= bound if op == "<=" else worst >= bound


def summarise(results: dict, warmup: int) -> dict:
    systems = {}
    for name, runs in results.items():
        ok = [r for r in runs if not r.get("failed")]
        rounds = [{"seconds_per_step": step_rates(r, warmup)[0], "tokens_per_second": step_rates(r, warmup)[1],
                   "tokens_per_step": r["tokens_per_step"][warmup:], "peak_rss_mib": r["peak_rss_mib"],
                   "peak_minus_import_mib": r["peak_rss_mib"] - r["rss_after_import_mib"],
                   "trainable_params": r.get("trainable_params")} for r in ok]
        systems[name] = {"per_round": rounds, "failed_rounds": len(runs) - len(ok)}
    ratios = []
    for num, den, kind, target in RATIOS:
        if num not in systems or den not in systems:
            continue
        a, b = results[num], results[den]
        entry = {"num": num, "den": den, "kind": kind}
        entry["values"] = _ratio(entry, a, b, warmup)
        entry["same_batches"] = None if kind != "speed" else all(per_round(
            a, b, lambda x, y: x["tokens_per_step"] == y["tokens_per_step"], skip_failed=True))
        if target and entry["values"]:
            _target(entry, target)
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
            f"| {spread([r['seconds_per_step'] for r in pr])} "
            f"| {spread([r['tokens_per_second'] for r in pr], '{:.0f}')} "
            f"| {spread([r['peak_rss_mib'] for r in pr], '{:.0f}')} "
            f"| {spread([r['peak_minus_import_mib'] for r in pr], '{:.0f}')} | {len(pr)}/{n} |")
    lines += ["", "| ratio | median (min–max over rounds) | target | met (median / every round) |", "|---|---|---|---|"]
    for r in summary["ratios"]:
        what = "peak RSS" if r["kind"] == "mem" else "throughput"
        label = f"{what}: {r['num']} / {r['den']}"
        if r["kind"] == "speed" and r["same_batches"] is False:
            label += " (tokens per step differ!)"
        met = "–"
        if "met_median" in r:
            met = f"{'yes' if r['met_median'] else 'NO'} / {'yes' if r['met_every_round'] else 'NO'}"
        lines.append(f"| {label} | {spread(r['values'], '{:.2f}')} | {r.get('target', '–')} | {met} |")
    return "\n".join(lines)


def parse_args():
    parser = harness_parser(__doc__, rounds=3, steps=4, warmup=1, batch_size=4, max_length=256, threads=2,
                            systems=SYSTEMS, default_systems=DEFAULT_SYSTEMS,
                            quick="tiny check of the harness: 1 round, 3 steps, hidden 64, 2 layers")
    add_shape_options(parser, prompt_len=64, response_len=48, hidden=768, layers=12, heads=12, intermediate=2304)
    add_malloc_option(parser)
    args = parser.parse_args()
    if args.child:
        return args, None, None
    apply_quick(args, rounds=1, steps=3, warmup=1, hidden=64, layers=2, heads=2, intermediate=128, prompt_len=32,
                response_len=16, max_length=128)
    names = chosen_systems(parser, args, SYSTEMS)
    fields = dpokit_lora_fields()
    skipped = {}
    for n in names:
        kind, opts = SYSTEMS[n]
        missing = [k for k in opts if kind == "dpokit" and k not in fields]
        if missing:
            skipped[n] = f"dpokit.TrainConfig has no field(s) {missing}"
            print(f"skipping {n}: {skipped[n]}", flush=True)
    args.pairs = args.batch_size * args.steps  # one epoch covers the run: every step sees new pairs
    return args, [n for n in names if n not in skipped], skipped


def report(args, names: list[str], setup: dict, summary: dict, tree: dict, skipped: dict, failed: dict) -> str:
    """Print the table and what did not run or changed; return the table."""
    m = setup["model"]
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
    if tree["before"] != tree["after"]:
        print("\nWARNING: src/ changed while the benchmark ran (different runs may have measured different code): "
              f"{tree['before']['src_state_sha1'][:10]} -> {tree['after']['src_state_sha1'][:10]}")
    if failed:
        print("\nfailed runs: " + ", ".join(f"{n} x{k}" for n, k in failed.items()) + " (log tails in the JSON)")
    return text


def main() -> None:
    args, names, skipped = parse_args()
    if args.child:
        return serve_child(args.child, CHILDREN)
    tree = {"before": tree_state()}
    t0 = time.perf_counter()
    with workdir(args, "dpokit_scale_") as work:
        setup = build_inputs(args, work)
        run = system_runner(__file__, SYSTEMS, child_spec(setup, args), args, work, failed="record")
        results = interleave(args.rounds, names, run, lambda name, round_, r: print(
            run_line(round_, args.rounds, name, r, args.warmup, 13), flush=True))
    tree["after"] = tree_state()
    summary = summarise(results, args.warmup)
    failed = {n: k for n, k in ((n, sum(1 for r in rs if r.get("failed"))) for n, rs in results.items()) if k}
    text = report(args, names, setup, summary, tree, skipped, failed)
    path = write_result(args, "scale-", {"setup": setup, "summary": summary, "skipped": skipped, "raw": results,
                                         "dpokit_tree": tree, "table_markdown": text}, t0,
                        {"allocators": allocators(names, args.malloc)})
    print(f"\nwrote {path} ({time.perf_counter() - t0:.0f} s)")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
