"""What every method of the reward–KL sweep shares (dpokit.experiments.paper.frontier): the sweep's sizes, the task
(π_ref, its preference pairs, the prompts, the judge) and how one policy becomes a point.

A point is the judge's mean score of the policy's samples on held-out prompts against KL(π‖π_ref) per sequence
estimated from the same samples (dpokit.experiments.iterate.kl_per_sequence). Each point keeps its per-sample
scores and KLs (``scores``, ``kls``) for the bootstrap of dpokit.experiments.paper.frontier_stats, and what it cost
(``samples_drawn``: texts sampled to train it; ``judge_calls``: ground-truth labels; ``reward_model_calls``: labels
by the learned reward model), so that methods are compared at their sample budgets too.
"""

from __future__ import annotations

import importlib
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from dpokit.config.experiments import DemoConfig

@dataclass(frozen=True)
class Sizes:
    """Every size of one sweep: the demo's task (SFT, pairs), the evaluation, and each method's knob values."""

    demo: DemoConfig = field(default_factory=DemoConfig)  # SFT steps, prompts, completions, generation length
    eval_prompts: int = 128
    eval_samples: int = 2  # samples per held-out prompt for each point
    batch_size: int = 16
    dpo_betas: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0)
    dpo_steps: int = 150
    dpo_lr: float = 1e-4
    save_every: int = 50  # a point per checkpoint along each run (DPO, Preferred-FT, Unlikelihood)
    baseline_steps: int = 150
    baseline_lr: float = 1e-4
    unlikelihood_alpha: float = 1.0
    ppo_kl_coefs: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0)
    ppo_steps: int = 32
    ppo_batch_size: int = 32
    ppo_epochs: int = 2  # dpokit.experiments.paper.ppo.train_ppo's default (its minibatches of 8)
    ppo_lr: float = 1e-4
    reward_model_steps: int = 150
    reward_model_lr: float = 1e-4
    best_of_n: tuple[int, ...] = (1, 4, 16, 64, 128)
    best_of_n_prompts: int = 128  # Best-of-N's sampling grows with N: one sample per prompt, on this many
    online_betas: tuple[float, ...] = (0.1, 0.5)  # online DPO (dpokit.experiments.paper.online): β values
    online_rounds: int = 4  # rounds of sampling, labelling and training; a point per round
    online_steps: int = 50  # DPO steps per round


SIZES = {
    "full": Sizes(),
    # about 10 minutes on a 2-core CPU: fewer prompts, β values, steps and PPO coefficients
    "quick": Sizes(demo=DemoConfig(prompts=128), eval_prompts=64, dpo_betas=(0.1, 0.5, 2.0), dpo_steps=60,
                   save_every=30, baseline_steps=60, ppo_kl_coefs=(0.03, 0.3), ppo_steps=16,
                   reward_model_steps=60, best_of_n=(1, 4, 16), best_of_n_prompts=64,
                   online_betas=(0.5,), online_rounds=2, online_steps=30),
    # seconds, for tests: every stage runs once, on minimal data
    "tiny": Sizes(demo=DemoConfig(sft_reviews=32, sft_steps=2, prompts=16, completions=3, max_new_tokens=8),
                  eval_prompts=4, eval_samples=1, batch_size=4, dpo_betas=(0.5,), dpo_steps=2, save_every=1,
                  baseline_steps=1, ppo_kl_coefs=(0.1,), ppo_steps=1, ppo_batch_size=4, ppo_epochs=1,
                  reward_model_steps=1, best_of_n=(1, 2), best_of_n_prompts=4,
                  online_betas=(0.5,), online_rounds=2, online_steps=1),
}


@dataclass
class Task:
    """What every method shares: π_ref, the preference pairs, the prompts, the judge, and where to write."""

    out: Path
    sizes: Sizes
    sft_dir: str
    pairs_path: str
    train_prompts: list[str]
    held_out: list[str]
    tokenizer: object
    reference: object  # π_ref, in memory
    judge: Callable[[list[str]], list[float]]
    threads: int | None
    log: Callable[[str], None]
    reward_model: str | None = None  # trained once, on first use (PPO and Best-of-N share it)
    pair_samples: int = 0  # π_ref's samples drawn (and judged) to build the pairs: the offline methods' budget

    def offline_cost(self) -> dict:
        """The budget of a method trained on the pairs alone (DPO, Preferred-FT, Unlikelihood): π_ref's samples
        and their ground-truth labels."""
        return cost(self.pair_samples, self.pair_samples)


def cost(samples_drawn: int, judge_calls: int, reward_model_calls: int = 0) -> dict:
    """A point's sample budget: texts sampled for training, ground-truth judge calls, reward-model calls."""
    return {"samples_drawn": samples_drawn, "judge_calls": judge_calls, "reward_model_calls": reward_model_calls}


def optional_module(name: str):
    """dpokit.experiments.paper.`name`, or None when that module does not exist (an error inside it is raised)."""
    try:
        return importlib.import_module(f"dpokit.experiments.paper.{name}")
    except ModuleNotFoundError as error:
        if error.name != f"dpokit.experiments.paper.{name}":
            raise
        return None


def prepare_task(out: Path, sizes: Sizes, seed: int, threads: int | None, log: Callable[[str], None], *,
                 largest_budget: float = 1.0) -> Task:
    """The demo's SFT (π_ref), then its pairs: π_ref's samples labelled by the judge (dpokit.experiments.iterate, the demo's
    round); the held-out prompts are drawn as the demo draws them (distinct, never used in training, also by the
    `largest_budget` × more training prompts of a data-budget sweep: :func:`budget_task`)."""
    from dpokit.api import load_model, load_tokenizer
    from dpokit.experiments.demo import train_reference
    from dpokit.judges.loader import load_judge
    from dpokit.experiments.reviews import base_model_path, review_prefixes
    from dpokit.runtime.threads import apply_threads, config_width

    demo = replace(sizes.demo, seed=seed, batch_size=sizes.batch_size, eval_samples=sizes.eval_samples,
                   threads=threads or 0)
    base = demo.model or base_model_path()
    tokenizer = load_tokenizer(base)
    apply_threads(threads, width=config_width(base), log=log)
    sft_dir = train_reference(demo, out)
    # review_prefixes(n) is the start of review_prefixes(m > n): every budget's prompts are kept out of held_out
    seen = set(review_prefixes(budget_prompts(demo.prompts, largest_budget), seed + 2, tokenizer))
    candidates = review_prefixes(sizes.eval_prompts * 4, seed + 3, tokenizer)
    held_out = list(dict.fromkeys(p for p in candidates if p not in seen))[: sizes.eval_prompts]
    task = Task(out, replace(sizes, demo=demo), sft_dir, "", [], held_out, tokenizer, load_model(sft_dir),
                load_judge(demo.judge), threads, log)
    return budget_task(task, 1.0, out)


def point_budget(point: dict) -> float:
    """The data budget a point was trained on (its knob's ``budget``; a method without one ran on today's, 1)."""
    return float(point["knob"].get("budget", 1.0))


def budget_prompts(prompts: int, budget: float) -> int:
    """The number of training prompts of a data budget: `budget` × the sweep's."""
    return max(1, round(prompts * budget))


def budget_task(task: Task, budget: float, out: Path) -> Task:
    """`task` with `budget` × its training prompts and their pairs (π_ref's samples labelled by the judge, written
    to OUT/pairs.jsonl); π_ref, the judge and the held-out prompts are shared, the reward model is not (it is
    fitted to each budget's pairs on first use)."""
    from dpokit.experiments.iterate import sample_and_label, write_pairs
    from dpokit.experiments.reviews import review_prefixes

    demo, seed = task.sizes.demo, task.sizes.demo.seed
    out.mkdir(parents=True, exist_ok=True)
    prompts = review_prefixes(budget_prompts(demo.prompts, budget), seed + 2, task.tokenizer)
    labelled = sample_and_label(task.reference, task.tokenizer, task.judge, prompts, demo.round_settings(), seed,
                                random.Random(seed), "prompt")
    pairs_path = out / "pairs.jsonl"
    write_pairs(pairs_path, labelled.pairs)
    task.log(f"      {len(labelled.pairs)} pairs from {len(prompts)} prompts; {len(task.held_out)} held-out prompts")
    return replace(task, out=out, pairs_path=str(pairs_path), train_prompts=prompts, reward_model=None,
                   pair_samples=len(prompts) * demo.completions)


def reward_summary(scores: list[float]) -> dict:
    """Mean judge score, its standard error (the sampling noise of a point), share of positive scores, count."""
    from dpokit.judges.pointwise import POSITIVE_THRESHOLD

    n = len(scores)
    mean = sum(scores) / n
    se = math.sqrt(sum((s - mean) ** 2 for s in scores) / (n - 1) / n) if n > 1 else 0.0
    return {"reward": mean, "reward_se": se, "positive_share": sum(s > POSITIVE_THRESHOLD for s in scores) / n,
            "samples": n}


def measure(task: Task, policy, method: str, knob: dict, cost: dict | None = None,
            model: str | None = None) -> dict:
    """One point: the judge's mean score of `policy`'s samples on the held-out prompts and the mean of
    log π(y|x) − log π_ref(y|x) over the same samples, with both per sample and the point's `cost`
    (:func:`cost`). Every point samples with the same seed. `model`, the policy's directory when it is kept on
    disk, is recorded so that the point can be measured further (dpokit.experiments.paper.precision)."""
    from dpokit.experiments.iterate import START_EVAL_SEED

    demo = task.sizes.demo
    scores, kls = held_out_draw(task, policy, demo.eval_samples, demo.seed + START_EVAL_SEED)
    point = {"method": method, "knob": knob, **reward_summary(scores), "kl": sum(kls) / len(kls),
             "kl_estimate": "sampled", **(cost or {}), "scores": scores, "kls": kls}
    if model is not None:
        point["model"] = str(model)
    task.log(f"      {method} {knob}: reward {point['reward']:.3f}, KL {point['kl']:.2f}")
    return point


def held_out_draw(task: Task, policy, per_prompt: int, seed: int) -> tuple[list[float], list[float]]:
    """`per_prompt` samples of `policy` on every held-out prompt drawn with `seed`: the judge's score and
    log π(y|x) − log π_ref(y|x) of each."""
    from dpokit.experiments.iterate import held_out_samples, kl_per_sequence

    settings = replace(task.sizes.demo, eval_samples=per_prompt).round_settings()
    samples, scores = held_out_samples(policy, task.tokenizer, task.judge, task.held_out, settings, seed)
    kls = kl_per_sequence(policy, task.reference, [x for group in samples for x in group])
    return [s for group in scores for s in group], kls
