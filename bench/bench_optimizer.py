#!/usr/bin/env python
"""One AdamW step over the benchmark model's parameters: torch's for-loop, foreach and fused kernels.

The parameters are bench_vs_trl.py's random Llama's (bench/_setup.py: 8.39M parameters in 39 tensors, vocabulary
8,192, hidden 256, 4 layers, MLP 1,024), with random gradients. Each kernel takes 3 untimed steps, then --steps timed
ones; the kernels run interleaved, --rounds times, and the table gives the median step (min-max over rounds) and
how far the fused kernel's parameters end from the for-loop kernel's after the same steps.

    python bench/bench_optimizer.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from _setup import random_llama

KERNELS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def parameters(seed: int) -> list[torch.nn.Parameter]:
    """The benchmark's random Llama's parameters (bench/_setup.py), with random gradients."""
    model = random_llama(vocab=8192, hidden=256, max_positions=1024, tie_word_embeddings=False, seed=seed)
    params = list(model.parameters())
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator) * 1e-3
    return params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = {name: parameters(0) for name in KERNELS}
    optimizers = {name: torch.optim.AdamW(models[name], lr=1e-3, weight_decay=0.01, **kw)
                  for name, kw in KERNELS.items()}
    for optimizer in optimizers.values():
        for _ in range(3):
            optimizer.step()
    times = {name: [] for name in KERNELS}
    for _ in range(args.rounds):
        for name, optimizer in optimizers.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                optimizer.step()
            times[name].append((time.perf_counter() - start) / args.steps * 1e3)
    count = sum(p.numel() for p in models["fused"])
    print(f"AdamW over {count / 1e6:.2f}M parameters in {len(models['fused'])} tensors, {args.threads} threads, "
          f"{args.steps} steps x {args.rounds} rounds")
    print("| kernel | ms per step, median (min-max) |\n|---|---|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f}) |")
    drift = max((a - b).abs().max().item() for a, b in zip(models["fused"], models["for-loop"]))
    print(f"max |fused - for-loop| after {3 + args.steps * args.rounds} steps: {drift:.2e}")


if __name__ == "__main__":
    main()
