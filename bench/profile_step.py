"""Where a dpokit training step's time goes, at bench_vs_trl.py's shape: the operators by self time, and how fast
the matrix multiplications themselves run against the machine's float32 matmul rate.

It builds the same tokenizer, model and data as bench_vs_trl.py (bench/_setup.py), trains `--steps` steps with
torch's profiler on (FLOPs counted for aten::mm) and measures the matmul rate right before and after. The
question it answers: is the gap between dpokit's executed FLOP rate and the matmul rate in the matmuls (their
shapes: hidden 256 is a thin matrix) or outside them (attention, element-wise kernels, the optimizer, Python)?
The profiler adds overhead of its own, so shares are indicative; seconds per step come from bench_vs_trl.py.

    python bench/profile_step.py                     # resident reference, 4 steps, 2 threads
    python bench/profile_step.py --precompute-ref    # precomputed reference log-probs
    python bench/profile_step.py --lora-r 16 --hidden 768 --layers 12 --heads 12 --intermediate 2304 \
        --batch-size 4 --threads 1                   # bench_scale.py's LoRA run
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _harness import matmul_gflops
from _setup import add_shape_options, build_everything

HERE = Path(__file__).resolve().parent


def profile(args, setup: dict, work: Path) -> dict:
    """Train `args.steps` steps under the profiler; return the operator table and the matmul figures."""
    import torch

    import dpokit.api as api
    import dpokit.train.loop as trainer
    import dpokit.train.run as run
    from dpokit.config import TrainConfig

    trainer.save_checkpoint = lambda *a, **k: None  # not part of a step
    config = TrainConfig(model=setup["model_dir"], data=setup["data"], output=str(work / "run"), overwrite=True,
                         batch_size=args.batch_size, max_length=args.max_length,
                         max_prompt_length=setup["max_prompt_length"], max_steps=args.steps, optimizer="adamw",
                         lr=1e-6, warmup_steps=0, seed=args.seed, save_final=False, data_cache=False, save_every=0,
                         precompute_ref=args.precompute_ref, threads=args.threads,
                         **({"lora_r": args.lora_r, "lora_alpha": 2 * args.lora_r} if args.lora_r else {}))
    found: dict = {}
    real_train = run.train

    def train(*a, **k):  # the training loop only: loading, tokenising and precomputing stay outside
        found["rate_before"] = matmul_gflops(args.threads, args.matmul_size)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_flops=True) as prof:
            out = real_train(*a, **k)
        found["rate_after"] = matmul_gflops(args.threads, args.matmul_size)
        found["events"] = prof.key_averages()
        return out

    run.train = train  # run.py calls the loop by this name
    api.train_dpo(config)
    events = found["events"]
    total = sum(e.self_cpu_time_total for e in events)
    mm = next(e for e in events if e.key == "aten::mm")
    rate = max(found["rate_before"], found["rate_after"])
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[: args.top]
    return {
        "matmul_rate_gflops": [found["rate_before"], found["rate_after"]],
        "mm_gflop": mm.flops / 1e9, "mm_seconds": mm.self_cpu_time_total / 1e6,
        "mm_gflops": mm.flops / mm.self_cpu_time_total / 1e3,
        "mm_share_of_matmul_rate": mm.flops / mm.self_cpu_time_total / 1e3 / rate,
        "profiled_seconds": total / 1e6,
        "operators": [{"name": e.key, "self_seconds": e.self_cpu_time_total / 1e6,
                       "share": e.self_cpu_time_total / total, "calls": e.count} for e in top],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--pairs", type=int, default=64)
    add_shape_options(parser)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precompute-ref", action="store_true")
    parser.add_argument("--lora-r", type=int, default=0, help="LoRA of this rank (alpha 2r) instead of full fine-tuning")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--matmul-size", type=int, default=1024)
    parser.add_argument("--top", type=int, default=15, help="operators listed (default 15)")
    parser.add_argument("--workdir", help="keep the model and data here (default: a temporary directory)")
    parser.add_argument("--out", default=str(HERE / "results"), help="directory for the JSON result")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="dpokit_profile_"))
    work.mkdir(parents=True, exist_ok=True)
    setup = build_everything(args, work)
    result = profile(args, setup, work)
    print(f"{'operator':58s} {'self s':>8s} {'share':>7s} {'calls':>7s}")
    for op in result["operators"]:
        print(f"{op['name'][:58]:58s} {op['self_seconds']:8.3f} {op['share']:7.1%} {op['calls']:7d}")
    before, after = result["matmul_rate_gflops"]
    print(f"\naten::mm: {result['mm_gflop']:.1f} GFLOP in {result['mm_seconds']:.2f} s = {result['mm_gflops']:.1f} "
          f"GFLOP/s, {result['mm_share_of_matmul_rate']:.0%} of the float32 matmul rate ({before:.1f} before, "
          f"{after:.1f} after; the higher used), {result['mm_seconds'] / result['profiled_seconds']:.0%} of the profiled "
          "time")
    kind = ("precompute-" if args.precompute_ref else "") + (f"lora{args.lora_r}-" if args.lora_r else "")
    out = Path(args.out) / time.strftime(f"profile-{kind}%Y%m%d-%H%M%S.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "model": setup["model"], **result}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
