#!/usr/bin/env python
"""LoRA layers as one autograd function (dpokit.models.fused_lora) against peft's forward, per layer and in a model.

    python bench/bench_fused_lora.py               # bench_scale.py's LoRA shape: hidden 768, 12 layers, r 16
    python bench/bench_fused_lora.py --layers-only

Per layer: forward + backward of one frozen linear layer at `--tokens` tokens, alone, with peft's LoRA, and with
the fused function, interleaved; prints the median milliseconds and the adapter's overhead over the frozen layer.
In a model: for 8 packed batches of `--pairs` pairs (prompts ~200 tokens, responses ~120, each uniform in ±30%),
one forward + backward of the summed log-probs and one reference forward with the adapter disabled, alternately
fused and not (the order flipped every batch), on a random Llama with the lean gated MLP dpokit uses; prints the
median seconds of each, the per-batch speed-ups (median, min-max) and the largest differences.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import dpokit.models.fused_lora as fused_lora
from dpokit.data.batching import collate
from dpokit.models.gated_mlp import keep_less_in_gated_mlps
from dpokit.models.logprobs import sequence_logprobs
from dpokit.models.lora import LoraOptions, add_adapter
from _harness import on_off, speedup
from _setup import add_model_options, random_llama
from bench_last_layer import pairs


class _One(nn.Module):
    def __init__(self, inputs: int, outputs: int):
        super().__init__()
        self.proj = nn.Linear(inputs, outputs, bias=False)

    def forward(self, x):
        return self.proj(x)


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def layers(args) -> None:
    for inputs, outputs in ((args.hidden, args.hidden), (args.hidden, args.intermediate),
                            (args.intermediate, args.hidden)):
        frozen = _One(inputs, outputs).requires_grad_(False)
        peft = get_peft_model(_One(inputs, outputs), LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r,
                                                                target_modules=["proj"]))
        fused = get_peft_model(_One(inputs, outputs), LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r,
                                                                 target_modules=["proj"]))
        fused_lora.fuse_lora_linears(fused)
        x = torch.randn(args.tokens, inputs, requires_grad=True)
        grad = torch.randn(args.tokens, outputs)
        runs = {name: (lambda m=model: m(x).backward(grad)) for name, model in
                (("frozen", frozen), ("peft", peft), ("fused", fused))}
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, run in runs.items():
                run()
                times[name].append(_median_ms(run, 5))
        ms = {name: statistics.median(values) for name, values in times.items()}
        print(f"[{args.tokens} x {inputs}] -> {outputs}: frozen {ms['frozen']:.2f} ms, peft {ms['peft']:.2f} ms "
              f"(+{100 * (ms['peft'] / ms['frozen'] - 1):.0f}%), fused {ms['fused']:.2f} ms "
              f"(+{100 * (ms['fused'] / ms['frozen'] - 1):.0f}%)")


def model(args) -> None:
    batches = [collate(pairs(args.pairs, 8192, s), list(range(args.pairs)), layout="packed", pad_token_id=0)
               for s in range(8)]
    net = random_llama(vocab=8192, hidden=args.hidden, heads=args.heads, layers=args.layers, max_positions=2048,
                       intermediate=args.intermediate)
    keep_less_in_gated_mlps(net)
    net = add_adapter(net, LoraOptions(r=args.lora_r, alpha=2 * args.lora_r))
    for name, param in net.named_parameters():  # a trained adapter: B is not zero
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    fused_lora.fuse_lora_linears(net)
    fusable = fused_lora._fusable

    def step(on: bool, batch):
        fused_lora._fusable = fusable if on else (lambda *args: None)
        start = time.perf_counter()
        logps = sequence_logprobs(net, batch)
        logps.sum().backward()
        grads = [p.grad.clone() for p in net.parameters() if p.grad is not None]
        net.zero_grad(set_to_none=True)
        with torch.no_grad(), net.disable_adapter():
            sequence_logprobs(net, batch)
        return time.perf_counter() - start, (logps.detach(), grads)

    on, off, results = on_off(step, batches)
    worst = max((a[0] - b[0]).abs().max().item() for a, b in results)
    worst_grad = max((x - y).abs().max().item() / y.abs().max().item()
                     for a, b in results for x, y in zip(a[1], b[1]))
    print(f"model: fused {statistics.median(on):.3f} s  peft {statistics.median(off):.3f} s  speed-up "
          f"{speedup(on, off)}  max log-prob difference {worst:.2e}, max gradient difference {worst_grad:.2e} of "
          f"the gradient's largest entry")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_options(parser, hidden=768, layers=12, heads=12, intermediate=2304)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=1760, help="tokens of the per-layer runs (4 pairs of ~440)")
    parser.add_argument("--pairs", type=int, default=2, help="pairs per batch of the model runs")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the per-layer runs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layers-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    layers(args)
    if not args.layers_only:
        model(args)


if __name__ == "__main__":
    main()
