#!/usr/bin/env python
"""1 vs 2 intra-op threads on the kinds of work dpokit runs: the measurements behind dpokit/threads.py's rule.

    python bench/bench_threads.py                 # every kernel, 5-10 alternations each
    python bench/bench_threads.py --busy 1        # the same beside one busy background process

In one process, each kernel runs alternately with 1 and 2 threads (``torch.set_num_threads``), the order
flipped every round, so that slow drifts of the machine's load hit both counts alike. Kernels: on the demo's
model shape (Llama, width 128, 4 layers, vocabulary 2048) an SFT step (16 x 64 tokens), a DPO-sized step
(32 x 40), a reference forward pass (32 x 40) and sampling (128 sequences x 32 new tokens, KV cache); on the
benchmark shape (width 256, vocabulary 8192) a training step and a forward pass of 2 x 512 tokens. Prints the
median seconds per call and the ratio, with the load average; writes ``bench/results/threads-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from _setup import random_llama, start_busy, stop

HERE = Path(__file__).resolve().parent


def training_step(model, rows: int, length: int):
    ids = torch.randint(0, model.config.vocab_size, (rows, length))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def run():
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return run


def forward(model, rows: int, length: int):
    ids = torch.randint(0, model.config.vocab_size, (rows, length))

    def run():
        with torch.no_grad():
            model(ids)

    return run


def sampling(model, rows: int, new_tokens: int):
    ids = torch.randint(1, model.config.vocab_size, (rows, 6))

    def run():
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=True,
                           top_k=0, pad_token_id=0, eos_token_id=None)

    return run


def kernels() -> dict:
    """name -> (callable, alternations)."""
    demo = random_llama(vocab=2048, hidden=128, max_positions=1024)  # the embedded demo model's shape
    bench = random_llama(vocab=8192, hidden=256, max_positions=1024)  # the speed benchmark's
    return {
        "demo model: SFT step 16x64": (training_step(demo, 16, 64), 10),
        "demo model: DPO-sized step 32x40": (training_step(demo, 32, 40), 10),
        "demo model: reference forward 32x40": (forward(demo, 32, 40), 10),
        "demo model: sampling 128 x 32 tokens": (sampling(demo, 128, 32), 5),
        "bench shape: training step 2x512": (training_step(bench, 2, 512), 5),
        "bench shape: forward 2x512": (forward(bench, 2, 512), 5),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--busy", type=int, default=0, help="busy background processes during the measurement")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    busy = start_busy(args.busy, 900)
    rows = []
    print("| kernel | 1 thread (ms) | 2 threads (ms) | 2 threads / 1 thread | load avg. |\n|---|---|---|---|---|")
    try:
        for name, (run, rounds) in kernels().items():
            run()  # warm-up
            times: dict[int, list[float]] = {1: [], 2: []}
            for r in range(rounds):
                for count in (1, 2) if r % 2 == 0 else (2, 1):
                    torch.set_num_threads(count)
                    started = time.perf_counter()
                    run()
                    times[count].append(time.perf_counter() - started)
            one, two = statistics.median(times[1]), statistics.median(times[2])
            rows.append({"kernel": name, "one_thread_s": one, "two_threads_s": two, "ratio": two / one,
                         "loadavg": os.getloadavg()[0], "times": times})
            print(f"| {name} | {one * 1000:.0f} | {two * 1000:.0f} | {two / one:.2f} | {os.getloadavg()[0]:.1f} |",
                  flush=True)
    finally:
        stop(busy)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"threads-{time.strftime('%Y%m%d-%H%M%S')}-busy{args.busy}.json"
    path.write_text(json.dumps({"busy": args.busy, "cpus": os.cpu_count(), "torch": torch.__version__,
                                "rows": rows}, indent=1))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
