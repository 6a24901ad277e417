"""The paper's reward–KL frontier (§6.1, Fig. 2 left) on the demo's controlled-sentiment task.

The demo's SFT model is π_ref and its sampled, judge-labelled pairs are the preference data; then every method
sweeps its knob and each resulting policy becomes a point: the mean ground-truth reward (the judge, VADER) of its
samples on held-out prompts, against KL(π‖π_ref) per sequence estimated from the same samples
(dpokit.experiments.iterate.kl_per_sequence). The methods, as the paper names them:

* ``dpo``: β ∈ {0.05, …, 5}, each with checkpoints along training;
* ``preferred-ft`` and ``unlikelihood`` (dpokit.experiments.paper.baselines): checkpoints along training;
* ``ppo`` (a reward model learned from the pairs) and ``ppo-gt`` (the judge itself as reward): KL coefficients;
* ``best-of-n``: N samples of π_ref, the one the learned reward model scores highest; its KL is the analytic
  bound log N − (N−1)/N (Stiennon et al. 2020), not a sampled estimate.

PPO, PPO-GT and Best-of-N come from dpokit.experiments.paper.reward_model/ppo/best_of_n; when those modules are absent
their points are left out (and the report says so).
"""

from __future__ import annotations

import importlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from dpokit.config.experiments import METHODS, SWEEPS, DemoConfig  # METHODS: re-exported
from dpokit.errors import ConfigError


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


SIZES = {
    "full": Sizes(),
    # about 10 minutes on a 2-core CPU: fewer prompts, β values, steps and PPO coefficients
    "quick": Sizes(demo=DemoConfig(prompts=128), eval_prompts=64, dpo_betas=(0.1, 0.5, 2.0), dpo_steps=60,
                   save_every=30, baseline_steps=60, ppo_kl_coefs=(0.03, 0.3), ppo_steps=16,
                   reward_model_steps=60, best_of_n=(1, 4, 16), best_of_n_prompts=64),
    # seconds, for tests: every stage runs once, on minimal data
    "tiny": Sizes(demo=DemoConfig(sft_reviews=32, sft_steps=2, prompts=16, completions=3, max_new_tokens=8),
                  eval_prompts=4, eval_samples=1, batch_size=4, dpo_betas=(0.5,), dpo_steps=2, save_every=1,
                  baseline_steps=1, ppo_kl_coefs=(0.1,), ppo_steps=1, ppo_batch_size=4, ppo_epochs=1,
                  reward_model_steps=1, best_of_n=(1, 2), best_of_n_prompts=4),
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


def optional_module(name: str):
    """dpokit.experiments.paper.`name`, or None when that module does not exist (an error inside it is raised)."""
    try:
        return importlib.import_module(f"dpokit.experiments.paper.{name}")
    except ModuleNotFoundError as error:
        if error.name != f"dpokit.experiments.paper.{name}":
            raise
        return None


def prepare_task(out: Path, sizes: Sizes, seed: int, threads: int | None, log: Callable[[str], None]) -> Task:
    """The demo's SFT (π_ref), then its pairs: π_ref's samples labelled by the judge (dpokit.experiments.iterate, the demo's
    round); the held-out prompts are drawn as the demo draws them (distinct, never used in training)."""
    from dpokit.api import load_model, load_tokenizer
    from dpokit.experiments.demo import train_reference
    from dpokit.experiments.iterate import sample_and_label, write_pairs
    from dpokit.judges.loader import load_judge
    from dpokit.experiments.reviews import base_model_path, review_prefixes
    from dpokit.runtime.threads import apply_threads, config_width

    demo = replace(sizes.demo, seed=seed, batch_size=sizes.batch_size, eval_samples=sizes.eval_samples,
                   threads=threads or 0)
    base = demo.model or base_model_path()
    tokenizer = load_tokenizer(base)
    apply_threads(threads, width=config_width(base), log=log)
    sft_dir = train_reference(demo, out)
    reference = load_model(sft_dir)
    judge = load_judge(demo.judge)
    train_prompts = review_prefixes(demo.prompts, seed + 2, tokenizer)
    seen = set(train_prompts)
    candidates = review_prefixes(sizes.eval_prompts * 4, seed + 3, tokenizer)
    held_out = list(dict.fromkeys(p for p in candidates if p not in seen))[: sizes.eval_prompts]
    labelled = sample_and_label(reference, tokenizer, judge, train_prompts, demo.round_settings(), seed,
                                random.Random(seed), "prompt")
    pairs_path = out / "pairs.jsonl"
    write_pairs(pairs_path, labelled.pairs)
    log(f"      {len(labelled.pairs)} pairs from {len(train_prompts)} prompts; {len(held_out)} held-out prompts")
    return Task(out, replace(sizes, demo=demo), sft_dir, str(pairs_path), train_prompts, held_out, tokenizer,
                reference, judge, threads, log)


def reward_summary(scores: list[float]) -> dict:
    """Mean judge score, its standard error (the sampling noise of a point), share of positive scores, count."""
    from dpokit.judges.pointwise import POSITIVE_THRESHOLD

    n = len(scores)
    mean = sum(scores) / n
    se = math.sqrt(sum((s - mean) ** 2 for s in scores) / (n - 1) / n) if n > 1 else 0.0
    return {"reward": mean, "reward_se": se, "positive_share": sum(s > POSITIVE_THRESHOLD for s in scores) / n,
            "samples": n}


def measure(task: Task, policy, method: str, knob: dict) -> dict:
    """One point: the judge's mean score of `policy`'s samples on the held-out prompts and the mean of
    log π(y|x) − log π_ref(y|x) over the same samples. Every point samples with the same seed."""
    from dpokit.experiments.iterate import START_EVAL_SEED, held_out_samples, kl_per_sequence

    demo = task.sizes.demo
    samples, scores = held_out_samples(policy, task.tokenizer, task.judge, task.held_out, demo.round_settings(),
                                       demo.seed + START_EVAL_SEED)
    scores = [s for group in scores for s in group]
    kls = kl_per_sequence(policy, task.reference, [x for group in samples for x in group])
    point = {"method": method, "knob": knob, **reward_summary(scores), "kl": sum(kls) / len(kls),
             "kl_estimate": "sampled"}
    task.log(f"      {method} {knob}: reward {point['reward']:.3f}, KL {point['kl']:.2f}")
    return point


def _checkpoint_points(task: Task, method: str, runs: list[tuple[int, str]], knob: dict) -> list[dict]:
    """A point per checkpoint; each checkpoint is deleted once measured (its optimizer state is twice the model):
    the run's final/ model, the last checkpoint's weights, stays."""
    from dpokit.api import load_model

    points = []
    for step, path in runs:
        points.append(measure(task, load_model(path), method, {**knob, "step": step}))
        shutil.rmtree(path)
    return points


def dpo_points(task: Task) -> list[dict]:
    """DPO at every β of the sweep, a point per checkpoint along each run."""
    from dpokit.api import train_dpo
    from dpokit.config import TrainConfig
    from dpokit.experiments.paper.baselines import checkpoint_dirs

    s, points = task.sizes, []
    for beta in s.dpo_betas:
        output = str(task.out / "dpo" / f"beta-{beta:g}")
        train_dpo(TrainConfig(model=task.sft_dir, data=task.pairs_path, output=output, beta=beta, lr=s.dpo_lr,
                              optimizer="adamw", warmup_steps=min(10, s.dpo_steps // 4), max_steps=s.dpo_steps,
                              batch_size=s.batch_size, seed=s.demo.seed, save_every=s.save_every,
                              save_every_minutes=0, overwrite=True, data_cache=False, max_length=128,
                              max_prompt_length=16, precompute_ref=True, threads=task.threads))
        points += _checkpoint_points(task, "dpo", checkpoint_dirs(output), {"beta": beta})
    return points


def preferred_ft_points(task: Task) -> list[dict]:
    """Preferred-FT: SFT on the chosen responses, a point per checkpoint."""
    from dpokit.experiments.paper.baselines import train_preferred_ft

    s = task.sizes
    runs = train_preferred_ft(task.sft_dir, task.pairs_path, str(task.out / "preferred-ft"), steps=s.baseline_steps,
                              lr=s.baseline_lr, batch_size=s.batch_size, seed=s.demo.seed, save_every=s.save_every,
                              threads=task.threads)
    return _checkpoint_points(task, "preferred-ft", runs, {})


def unlikelihood_points(task: Task) -> list[dict]:
    """Unlikelihood: chosen likelihood up, rejected tokens' probability down; a point per checkpoint."""
    from dpokit.experiments.paper.baselines import train_unlikelihood

    s = task.sizes
    runs = train_unlikelihood(task.sft_dir, task.pairs_path, str(task.out / "unlikelihood"), steps=s.baseline_steps,
                              alpha=s.unlikelihood_alpha, lr=s.baseline_lr, batch_size=s.batch_size,
                              seed=s.demo.seed, save_every=s.save_every, threads=task.threads)
    return _checkpoint_points(task, "unlikelihood", runs, {"alpha": s.unlikelihood_alpha})


def _reward_model(task: Task):
    """The reward model learned from the pairs (trained on first use) as a judge."""
    module = optional_module("reward_model")
    if task.reward_model is None:
        s = task.sizes
        task.log("      training the reward model on the pairs")
        task.reward_model = module.train_reward_model(
            task.sft_dir, task.pairs_path, str(task.out / "reward_model"), steps=s.reward_model_steps,
            lr=s.reward_model_lr, batch_size=s.batch_size, seed=s.demo.seed, threads=task.threads, log=task.log)
    return module.reward_model_judge(task.reward_model)


def _ppo_sweep(task: Task, method: str, reward) -> list[dict]:
    from dpokit.api import load_model

    ppo, s, points = optional_module("ppo"), task.sizes, []
    for coef in s.ppo_kl_coefs:
        path = ppo.train_ppo(task.sft_dir, reward, task.train_prompts, str(task.out / method / f"kl-{coef:g}"),
                             kl_coef=coef, target_kl=None, steps=s.ppo_steps, batch_size=s.ppo_batch_size,
                             ppo_epochs=s.ppo_epochs, lr=s.ppo_lr, max_new_tokens=s.demo.max_new_tokens,
                             temperature=s.demo.temperature, seed=s.demo.seed, threads=task.threads, log=task.log)
        points.append(measure(task, load_model(path), method, {"kl_coef": coef}))
    return points


def ppo_points(task: Task) -> list[dict]:
    """PPO against the reward model learned from the pairs, at each KL coefficient."""
    return _ppo_sweep(task, "ppo", _reward_model(task))


def ppo_gt_points(task: Task) -> list[dict]:
    """PPO against the ground-truth reward (the judge itself), at each KL coefficient."""
    return _ppo_sweep(task, "ppo-gt", task.judge)


def best_of_n_bound(n: int) -> float:
    """KL(best-of-N ‖ π_ref) ≤ log N − (N−1)/N (exact for continuous rewards; Stiennon et al. 2020)."""
    return math.log(n) - (n - 1) / n


def best_of_n_points(task: Task) -> list[dict]:
    """Best-of-N of π_ref under the learned reward model, scored by the judge; KL: the analytic bound."""
    module, s, demo, points = optional_module("best_of_n"), task.sizes, task.sizes.demo, []
    reward = _reward_model(task)
    prompts = task.held_out[: s.best_of_n_prompts]
    for n in s.best_of_n:
        texts = module.best_of_n(task.reference, task.tokenizer, prompts, n, reward,
                                 max_new_tokens=demo.max_new_tokens, temperature=demo.temperature,
                                 seed=demo.seed + 10, batch_size=32 * max(1, min(n, 8)))
        scores = task.judge([p + t for p, t in zip(prompts, texts)])
        points.append({"method": "best-of-n", "knob": {"n": n}, **reward_summary(scores), "kl": best_of_n_bound(n),
                       "kl_estimate": "analytic bound log N - (N-1)/N"})
        task.log(f"      best-of-n N={n}: reward {points[-1]['reward']:.3f}, KL ≤ {points[-1]['kl']:.2f}")
    return points


# method -> (function giving its points, the dpokit.experiments.paper modules it needs)
SWEEPS: dict[str, tuple[Callable[[Task], list[dict]], tuple[str, ...]]] = {
    "dpo": (dpo_points, ()),
    "preferred-ft": (preferred_ft_points, ()),
    "unlikelihood": (unlikelihood_points, ()),
    "ppo": (ppo_points, ("reward_model", "ppo")),
    "ppo-gt": (ppo_gt_points, ("ppo",)),
    "best-of-n": (best_of_n_points, ("reward_model", "best_of_n")),
}


def frontier_contents(output: Path) -> list[str]:
    """What of an earlier sweep `output` holds: everything but dpokit's lock file (a sweep fills its directory)."""
    from dpokit.train.rundir import LOCK

    return sorted(p.name for p in output.iterdir() if p.name != LOCK) if output.is_dir() else []


def run_frontier(output: str, sizes: str | Sizes = "full", *, methods: tuple[str, ...] = METHODS, seed: int = 0,
                 threads: int | None = None, overwrite: bool = False, log: Callable[[str], None] = print) -> dict:
    """Run the sweep; write OUTPUT/frontier.json, frontier.png and report.md; return the frontier dict.

    OUTPUT is held like a training run's (dpokit.train.rundir): a directory in use by another sweep is refused, and one
    that holds anything is refused unless `overwrite` clears it first."""
    from dpokit.train.rundir import claim_output

    with claim_output(output, resume=False, overwrite=overwrite, contents=frontier_contents, resumable=False):
        return _run_frontier(output, sizes, methods=methods, seed=seed, threads=threads, log=log)


def _run_frontier(output: str, sizes: str | Sizes, *, methods: tuple[str, ...], seed: int, threads: int | None,
                  log: Callable[[str], None]) -> dict:
    from dpokit.experiments.paper.frontier_report import machine, write_outputs

    if isinstance(sizes, str):
        if sizes not in SIZES:
            raise ConfigError(f"--sizes must be one of {', '.join(SIZES)}; got {sizes!r}")
        sizes_name, sizes = sizes, SIZES[sizes]
    else:
        sizes_name = "custom"
    unknown = [m for m in methods if m not in SWEEPS]
    if unknown:
        raise ConfigError(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    stages = len(methods) + 1

    def say(line: str) -> None:
        log(f"[{time.monotonic() - started:6.0f} s] {line}")

    say(f"[1/{stages}] π_ref (the demo's SFT) and its preference pairs")
    task = prepare_task(out, sizes, seed, threads, say)
    reference = measure(task, task.reference, "sft", {})
    points, skipped, seconds = [], {}, {}
    for k, method in enumerate(methods, start=2):
        function, needs = SWEEPS[method]
        missing = [m for m in needs if optional_module(m) is None]
        if missing:
            skipped[method] = "dpokit.experiments.paper." + ", dpokit.experiments.paper.".join(missing) + " not available"
            say(f"[{k}/{stages}] {method}: skipped ({skipped[method]})")
            continue
        say(f"[{k}/{stages}] {method}")
        begun = time.monotonic()
        points += function(task)
        seconds[method] = time.monotonic() - begun
    frontier = {"points": points, "reference": reference, "skipped": skipped, "judge": task.sizes.demo.judge,
                "sizes": sizes_name,
                "config": json.loads(json.dumps(asdict(task.sizes))), "seed": seed,
                "seconds": {**seconds, "total": time.monotonic() - started}, "machine": machine()}
    write_outputs(out, frontier)
    say(f"done: {out / 'frontier.json'}, {out / 'frontier.png'}, {out / 'report.md'}")
    return frontier
