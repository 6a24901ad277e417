"""Check PPO on the demo's task: PPO-GT (reward: VADER) and PPO (reward: a reward model fitted to the demo's
pairs) from the demo's SFT model, evaluated like `dpokit demo` evaluates DPO.

Needs a finished `dpokit demo` run (its sft/final and pairs.jsonl). Trains with dpokit.experiments.paper's defaults unless
told otherwise, then samples 2 continuations of each of the demo's 128 held-out prompts from π_ref and from each
PPO policy and prints, per model, the mean VADER score, the positive share and KL(π‖π_ref) per sequence
(estimated from the policy's own samples), with the wall and CPU seconds of each training.

    dpokit demo --output runs/demo && python bench/bench_ppo.py runs/demo [--skip-rm] [--steps N] [--kl-coef B]
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _timed(fn, *args, **kwargs) -> tuple[object, dict]:
    wall, cpu = time.perf_counter(), _cpu_seconds()
    result = fn(*args, **kwargs)
    return result, {"wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(_cpu_seconds() - cpu, 1)}


def held_out_prompts(tokenizer, config) -> list[str]:
    """The demo's held-out prompts (same seeds and rule as dpokit.experiments.demo.run_demo)."""
    from dpokit.experiments.reviews import review_prefixes

    seen = set(review_prefixes(config.prompts, config.seed + 2, tokenizer))
    candidates = review_prefixes(config.eval_prompts * 4, config.seed + 3, tokenizer)
    return list(dict.fromkeys(p for p in candidates if p not in seen))[: config.eval_prompts]


def evaluate(path: str, reference, tokenizer, prompts: list[str], config) -> dict:
    """Mean VADER score, positive share and mean sequence KL of the policy at `path` on `prompts`."""
    from dpokit.experiments.iterate import held_out_samples, kl_per_sequence, score_summary
    from dpokit.judges.pointwise import vader_judge
    from dpokit.models.loading import load_model

    policy = load_model(path)
    samples, scores = held_out_samples(policy, tokenizer, vader_judge(), prompts, config.round_settings(),
                                       config.seed + 11)
    kls = kl_per_sequence(policy, reference, [x for group in samples for x in group])
    return {**score_summary([s for group in scores for s in group]), "kl": sum(kls) / len(kls)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("demo_dir", help="a finished `dpokit demo --output` directory")
    parser.add_argument("--output", default=None, help="where the models go (default: DEMO_DIR/ppo-bench)")
    parser.add_argument("--skip-rm", action="store_true", help="PPO-GT only (no reward model, no PPO on it)")
    parser.add_argument("--steps", type=int, default=None, help="PPO steps (default: train_ppo's)")
    parser.add_argument("--kl-coef", type=float, default=None, help="β_kl (default: train_ppo's)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    from dpokit.experiments.demo import DemoConfig
    from dpokit.judges.pointwise import vader_judge
    from dpokit.models.loading import load_model, load_tokenizer
    from dpokit.experiments.paper.ppo import train_ppo
    from dpokit.experiments.paper.reward_model import reward_model_judge, train_reward_model
    from dpokit.experiments.reviews import review_prefixes
    from dpokit.runtime.threads import apply_threads

    demo, out = Path(args.demo_dir), Path(args.output or Path(args.demo_dir) / "ppo-bench")
    config = DemoConfig(**{k: v for k, v in json.loads((demo / "report.json").read_text())["config"].items()
                           if k in DemoConfig.__dataclass_fields__})
    sft = str(demo / "sft" / "final")
    tokenizer = load_tokenizer(sft)
    apply_threads(args.threads)
    prompts = review_prefixes(config.prompts, config.seed + 2, tokenizer)  # the demo's training prompts
    options = {k: v for k, v in {"steps": args.steps, "kl_coef": args.kl_coef}.items() if v is not None}
    options["threads"] = args.threads
    runs: dict[str, dict] = {"sft": {"path": sft}}
    path, cost = _timed(train_ppo, sft, vader_judge(), prompts, str(out / "ppo-gt"), **options)
    runs["ppo_gt"] = {"path": path, **cost}
    if not args.skip_rm:
        rm, cost = _timed(train_reward_model, sft, str(demo / "pairs.jsonl"), str(out / "reward-model"),
                          threads=args.threads)
        runs["reward_model"] = {"path": rm, **cost}
        path, cost = _timed(train_ppo, sft, reward_model_judge(rm), prompts, str(out / "ppo-rm"), **options)
        runs["ppo_rm"] = {"path": path, **cost}
    reference = load_model(sft)
    held_out = held_out_prompts(tokenizer, config)
    for name, run in runs.items():
        if name != "reward_model":
            run.update(evaluate(run["path"], reference, tokenizer, held_out, config))
        print(json.dumps({name: run}), flush=True)


if __name__ == "__main__":
    main()
