#!/usr/bin/env python
"""The last decoder layer's per-token work only at the read positions (dpokit.models.last_layer), on vs off.

    python bench/bench_last_layer.py                         # bench_vs_trl's model: hidden 256, 4 layers
    python bench/bench_last_layer.py --hidden 768 --heads 12 --layers 12 --lora-r 16 --pairs 2   # bench_scale's

For 8 packed batches of `--pairs` pairs (prompts ~200 tokens, responses ~120, each uniform in ±30%), one
forward + backward of the summed log-probs and one reference forward without gradients, alternately with the
restriction on and off (the order flipped every batch), on a random Llama with the lean gated MLP dpokit uses.
Prints the median seconds of each, the per-batch speed-ups (median, min-max) and the largest log-prob difference.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import dpokit.models.last_layer as last_layer
from dpokit.data.batching import collate
from dpokit.models.gated_mlp import keep_less_in_gated_mlps
from dpokit.models.logprobs import sequence_logprobs
from dpokit.models.lora import LoraOptions, add_adapter
from dpokit.data.tokenize import TokenizedExample
from _harness import on_off, speedup
from _setup import add_model_options, random_llama


def pairs(count: int, vocab: int, seed: int) -> list[TokenizedExample]:
    g = torch.Generator().manual_seed(seed)
    spread = lambda mean: int(mean * (0.7 + 0.6 * torch.rand(1, generator=g).item()))  # noqa: E731
    ids = lambda n: tuple(torch.randint(1, vocab, (n,), generator=g).tolist())  # noqa: E731
    return [TokenizedExample(ids(spread(200)), (ids(spread(120)), ids(spread(120)))) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_options(parser)
    parser.add_argument("--lora-r", type=int, default=0, help="a LoRA adapter of this rank on every linear layer")
    parser.add_argument("--pairs", type=int, default=4, help="pairs per batch")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches = [collate(pairs(args.pairs, 8192, s), list(range(args.pairs)), layout="packed", pad_token_id=0)
               for s in range(8)]
    model = random_llama(vocab=8192, hidden=args.hidden, heads=args.heads, layers=args.layers, max_positions=2048,
                         intermediate=args.intermediate)
    keep_less_in_gated_mlps(model)
    if args.lora_r:
        model = add_adapter(model, LoraOptions(r=args.lora_r, alpha=2 * args.lora_r))
    modules = last_layer.per_token_modules

    def step(on: bool, batch) -> tuple[float, torch.Tensor]:
        last_layer.per_token_modules = modules if on else (lambda model: [])
        start = time.perf_counter()
        logps = sequence_logprobs(model, batch)
        logps.sum().backward()
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            sequence_logprobs(model, batch)
        return time.perf_counter() - start, logps.detach()

    on, off, results = on_off(step, batches)
    worst = max((a - b).abs().max().item() for a, b in results)
    print(f"on {statistics.median(on):.3f} s  off {statistics.median(off):.3f} s  speed-up {speedup(on, off)}  "
          f"max log-prob difference {worst:.2e}")


if __name__ == "__main__":
    main()
