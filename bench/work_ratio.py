#!/usr/bin/env python
"""How much matrix-multiply work a dpokit step and a TRL step do on the same batches, and so how far ahead of TRL a
float32 dpokit can be on a shape at all.

For each of bench_e2e.py's shapes (and any other given with --shape NAME=PROMPT,RESPONSE,MAX_LENGTH) it builds the
same fixture (bench/_setup.py: tokenizer, random Llama, pairs), forms every step's batches as dpokit's trainer does
(its epoch order, forward groups of <= --forward-tokens tokens, the packed layout) and counts the FLOPs of the
matrix multiplications of one step, in float32, for dpokit and for TRL's padded concatenated computation of the
same pairs (2 x pairs rows as wide as the longest prompt + response, the output layer at every position: the
"TRL-equivalent" count of bench_vs_trl.py, _report.forward_flops):

* decoder linear layers: 2 x weights x positions per forward (dpokit's last layer runs its attention output
  projection and MLP only at the positions that predict a response token);
* attention: 4 x hidden x (query, key) pairs per layer per forward, the pairs each SDPA call computes (dpokit: per
  example, the prompt's causal half-square and the responses against the example, or per prompt and response in
  rows of 1,024 tokens or more; TRL: the whole padded square of each row);
* output layer: 2 x vocabulary x hidden per position it runs at (dpokit: response tokens only);
* training: forward, then backward for the inputs (x1) and, in full fine-tuning, for the weights (x1); the
  reference (resident or LoRA's adapter-disabled policy) one forward; none with --precompute-ref; dpokit's
  output layer keeps its forward softmax (no recomputation) at these sizes.

The work ratio TRL / dpokit is what dpokit gains by not doing work. Divided by a step time it also gives the
highest speed ratio reachable if dpokit's step ran at the machine's matmul rate: ``--e2e RESULT.json`` reads
bench_e2e.py's measured float32 s/step and prints, per shape and mode, dpokit's step at 100% of the matmul rate
(`--rate` GFLOP/s, default: measured here) and TRL's measured step over it.

    python bench/work_ratio.py
    python bench/work_ratio.py --e2e bench/results/e2e-<timestamp>.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import types
from pathlib import Path

from _harness import matmul_gflops
from _report import forward_flops
from _setup import build_everything

SHAPES = {"chat": (64, 64, 256), "current": (200, 120, 512), "long": (1024, 256, 2048)}
# forward + input gradients + weight gradients of a trained layer; LoRA's frozen base has no weight gradients
POLICY_PASSES = {"full": 3, "precompute": 3, "lora": 2}
REFERENCE_PASSES = {"full": 1, "precompute": 0, "lora": 1}


def layer_weights(m: dict) -> tuple[int, int]:
    """A decoder layer's weights (q, k, v) and (o, MLP) of the random Llama (multi-head attention, gated MLP)."""
    h, i = m["hidden"], m["intermediate"]
    return 3 * h * h, h * h + 3 * h * i


def dpokit_forward(m: dict, batch) -> float:
    """FLOPs of one forward of a packed batch: linear layers, attention per SDPA call, the output layer."""
    qkv, rest = layer_weights(m)
    positions = batch.input_ids.numel()
    targets = batch.target_ids.numel()
    linear = 2 * (m["layers"] * qkv + (m["layers"] - 1) * rest) * positions + 2 * rest * targets
    pairs = 0
    width = batch.input_ids.shape[1]
    for row in batch.spans:
        for _, prompt, responses in row:
            sizes = [size for _, size in responses]
            if width >= 1024:  # one call per prompt (causal) and per response (its prompt, then itself)
                pairs += prompt * prompt // 2 + sum(s * (prompt + s) for s in sizes)
            elif prompt >= 128:  # the prompt's causal square, the responses against the example
                pairs += prompt * prompt // 2 + sum(sizes) * (prompt + sum(sizes))
            else:
                pairs += (prompt + sum(sizes)) ** 2
    attention = 4 * m["hidden"] * m["layers"] * pairs
    return linear + attention + 2 * m["params_lm_head"] * targets


def step_work(setup: dict, batch_size: int, forward_tokens: int, seed: int) -> list[dict]:
    """Per step of one epoch: dpokit's and TRL's forward FLOPs (one pass of the policy's forward each)."""
    import torch

    from dpokit.api import prepare_data
    from dpokit.config import TrainConfig
    from dpokit.models.loading import load_tokenizer
    from dpokit.train.loop import micro_batches

    config = TrainConfig(model=setup["model_dir"], data=setup["data"], output="unused", max_length=setup["max_length"],
                         max_prompt_length=setup["max_prompt_length"])
    examples = prepare_data(config, "dpo", load_tokenizer(setup["model_dir"]), log=lambda *_: None).train
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    objective = types.SimpleNamespace()  # micro_batches asks it only whether it pairs examples (KTO)
    steps = []
    for s in range(len(order) // batch_size):
        ids = order[s * batch_size : (s + 1) * batch_size]
        batches = micro_batches(objective, examples, ids, "packed", 0, forward_tokens)
        lengths = [len(examples[i].prompt_ids) + len(r) for i in ids for r in examples[i].responses]
        steps.append({"dpokit": sum(dpokit_forward(setup["model"], b) for b in batches),
                      "trl": forward_flops(setup["model"], len(lengths), max(lengths), len(lengths) * max(lengths))})
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--shape", action="append", default=[], help="NAME=PROMPT,RESPONSE,MAX_LENGTH (repeatable)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=80)
    parser.add_argument("--forward-tokens", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--spread", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--e2e", action="append", default=[],
                        help="a bench_e2e.py result JSON (repeatable): its float32 s/step against the matmul bound")
    parser.add_argument("--rate", type=float, help="float32 matmul GFLOP/s (default: measured now, 2 threads)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    args.intermediate = args.intermediate or 4 * args.hidden
    shapes = {name: SHAPES[name] for name in args.shapes.split(",") if name}
    for spec in args.shape:
        name, values = spec.split("=")
        shapes[name] = tuple(int(v) for v in values.split(","))
    measured = {}
    for path in args.e2e:
        measured.update(json.loads(Path(path).read_text())["summary"])
    rate = args.rate or (matmul_gflops(args.threads, 1024) if measured else None)
    lines = ["| shape | mode | dpokit GFLOP/step | TRL GFLOP/step | work ratio TRL / dpokit |"
             + (" dpokit s/step at the matmul rate | dpokit measured | TRL measured | highest ratio | measured ratio |"
                if measured else ""),
             "|---|---|---|---|---|" + ("---|---|---|---|---|" if measured else "")]
    for name, (prompt, response, max_length) in shapes.items():
        fixture = argparse.Namespace(seed=args.seed, vocab=args.vocab, hidden=args.hidden, layers=args.layers,
                                     heads=args.heads, intermediate=args.intermediate, max_length=max_length,
                                     spread=args.spread, prompt_len=prompt, response_len=response, pairs=args.pairs)
        with tempfile.TemporaryDirectory(prefix="dpokit_work_") as work:
            setup = build_everything(fixture, Path(work))
            setup["max_length"] = max_length
            steps = step_work(setup, args.batch_size, args.forward_tokens, args.seed)
        for mode in POLICY_PASSES:
            passes = POLICY_PASSES[mode] + REFERENCE_PASSES[mode]
            dpokit = sum(s["dpokit"] for s in steps) * passes / len(steps) / 1e9
            trl = sum(s["trl"] for s in steps) * passes / len(steps) / 1e9
            line = f"| {name} | {mode} | {dpokit:.1f} | {trl:.1f} | {trl / dpokit:.2f} |"
            found = measured.get(f"{name}/{mode}/float32", {}).get("systems", {})
            if found:
                ours = found["dpokit"]["e2e_seconds_per_step"]["summary"]["median"]
                theirs = found["trl"]["e2e_seconds_per_step"]["summary"]["median"]
                bound = dpokit / rate
                line += (f" {bound:.3f} | {ours:.3f} | {theirs:.3f} | {theirs / bound:.2f} | {theirs / ours:.2f} |")
            lines.append(line)
    if rate:
        print(f"float32 matmul rate: {rate:.1f} GFLOP/s")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
