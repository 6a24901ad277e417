#!/usr/bin/env python
"""Dense masked SDPA vs dpokit's ``segments`` kernel (``--attention sdpa`` vs ``segments``) on CPU: the
measurements behind dpokit.models.attention.SEGMENTS_MIN_LENGTH, SPLIT_MIN_PREFIX and the CPU default of
``--attention auto``.

    python bench/bench_attention.py                    # rows of 64 .. 1024 tokens, two model widths
    python bench/bench_attention.py --threads 2 --rounds 7
    python bench/bench_attention.py --per-segment      # one call per prompt and response at every row length
    python bench/bench_attention.py --lengths 160,440 --widths 768 --layers 2   # bench_scale.py's width
    python bench/bench_attention.py --lengths 1024,2048 --widths 256 --sliding-window 512   # Mistrals

For each row length L, a forward + backward of dpokit's shared-layout log-probs (dpokit.models.logprobs.sequence_logprobs)
on pairs whose prompt is 45% of L and whose two responses are 27.5% each (one pair per row, about 2,048 tokens
per call), alternately with the two kernels, the order flipped every round; prints the median seconds per call,
the ratio and its spread (min-max of the per-round ratios), and writes ``bench/results/attention-<time>.json``.
The ``segments`` kernel runs as shipped (two calls split after the prompt for rows shorter than
SEGMENTS_MIN_LENGTH whose prompts reach SPLIT_MIN_PREFIX, one call per segment from SEGMENTS_MIN_LENGTH on) unless
``--per-segment``. Models: random Llamas of `--layers` layers, 4 heads or one per 64 channels, of width 128 (the
embedded demo model's, vocabulary 2048) and 256 (the speed benchmark's, vocabulary 8192) unless ``--widths``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from dpokit.models.attention import SEGMENTS, set_attention
import dpokit.models.attention as attention
from dpokit.data.batching import collate
from dpokit.models.logprobs import sequence_logprobs
from dpokit.data.tokenize import TokenizedExample
from _setup import random_llama

HERE = Path(__file__).resolve().parent


def pairs(length: int, count: int, vocab: int) -> list[TokenizedExample]:
    """`count` pairs of `length` tokens in all: prompt 45%, responses 27.5% each, random ids."""
    g = torch.Generator().manual_seed(length)
    prompt, response = round(0.45 * length), round(0.275 * length)
    ids = lambda n: tuple(torch.randint(1, vocab, (n,), generator=g).tolist())  # noqa: E731
    return [TokenizedExample(ids(prompt), (ids(response), ids(length - prompt - response))) for _ in range(count)]


def step(model, batch) -> float:
    """Seconds for one forward + backward of the batch's summed log-probs."""
    start = time.perf_counter()
    sequence_logprobs(model, batch).sum().backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="64,128,256,512,1024", help="row lengths (tokens per pair)")
    parser.add_argument("--rounds", type=int, default=5, help="alternations per length (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--widths", default="128,256", help="model widths (vocabulary 2048 at 128, else 8192)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--per-segment", action="store_true", help="one call per prompt and response everywhere")
    parser.add_argument("--sliding-window", type=int, default=None, metavar="N",
                        help="Mistrals (the same shapes) whose layers attend within N tokens")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.per_segment:
        attention.SEGMENTS_MIN_LENGTH = 0
    rows = []
    print(f"threads {args.threads}; load average {os.getloadavg()[0]:.1f} at the start")
    for width in (int(x) for x in args.widths.split(",")):
        vocab = 2048 if width <= 128 else 8192
        model = random_llama(vocab=vocab, hidden=width, heads=max(4, width // 64), layers=args.layers,
                             max_positions=2048, sliding_window=args.sliding_window)
        for length in (int(x) for x in args.lengths.split(",")):
            batch = collate(pairs(length, max(1, 2048 // length), vocab), list(range(max(1, 2048 // length))),
                            layout="shared", pad_token_id=0)
            times = {"sdpa": [], SEGMENTS: []}
            for kernel in times:  # one untimed call each: first-call allocations
                set_attention(model, kernel)
                step(model, batch)
            for r in range(args.rounds):
                for kernel in (("sdpa", SEGMENTS) if r % 2 == 0 else (SEGMENTS, "sdpa")):
                    set_attention(model, kernel)
                    times[kernel].append(step(model, batch))
            ratios = [d / s for d, s in zip(times["sdpa"], times[SEGMENTS])]
            row = {"width": width, "length": length, "rows": batch.input_ids.shape[0],
                   "sdpa_s": statistics.median(times["sdpa"]), "segments_s": statistics.median(times[SEGMENTS]),
                   "speedup_median": statistics.median(ratios), "speedup_min": min(ratios),
                   "speedup_max": max(ratios)}
            rows.append(row)
            print(f"width {width:3d}  L {length:5d}  sdpa {row['sdpa_s']:.3f} s  segments {row['segments_s']:.3f} s  "
                  f"speed-up x{row['speedup_median']:.2f} ({row['speedup_min']:.2f}-{row['speedup_max']:.2f})",
                  flush=True)
    out = Path(args.out) / f"attention-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": args.threads, "rounds": args.rounds, "command": " ".join(sys.argv),
                               "sliding_window": args.sliding_window,
                               "segments_min_length": attention.SEGMENTS_MIN_LENGTH,
                               "split_min_prefix": attention.SPLIT_MIN_PREFIX,
                               "load_end": os.getloadavg()[0], "rows": rows}, indent=1))
    print(f"load average {os.getloadavg()[0]:.1f} at the end; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
