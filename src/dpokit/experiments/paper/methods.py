"""The methods of the reward–KL sweep, each a function from the task (dpokit.experiments.paper.task) to its points:

* ``dpo``: β ∈ {0.05, …, 5}, each with checkpoints along training;
* ``preferred-ft`` and ``unlikelihood`` (dpokit.experiments.paper.baselines): checkpoints along training;
* ``dpo-online`` and ``dpo-online-gt`` (dpokit.experiments.paper.online): rounds of `dpokit iterate` from π_ref,
  fresh samples of the current policy labelled by the learned reward model or by the judge; a point per round;
* ``ppo`` (a reward model learned from the pairs) and ``ppo-gt`` (the judge itself as reward): KL coefficients;
* ``best-of-n``: N samples of π_ref, the one the learned reward model scores highest; its KL is the analytic
  bound log N − (N−1)/N (Stiennon et al. 2020), not a sampled estimate.

PPO, PPO-GT and Best-of-N come from dpokit.experiments.paper.reward_model/ppo/best_of_n; when those modules are
absent their points are left out (and the report says so). Every point carries its sample budget
(dpokit.experiments.paper.task.cost).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable

from dpokit.experiments.paper.task import Task, cost, measure, optional_module, reward_summary


def _checkpoint_points(task: Task, method: str, runs: list[tuple[int, str]], knob: dict,
                       spent: dict | None = None) -> list[dict]:
    """A point per checkpoint; each checkpoint is deleted once measured (its optimizer state is twice the model):
    the run's final/ model, the last checkpoint's weights, stays."""
    from dpokit.api import load_model

    points = []
    for step, path in runs:
        points.append(measure(task, load_model(path), method, {**knob, "step": step},
                              spent or task.offline_cost()))
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


def learned_reward(task: Task):
    """The reward model learned from the pairs (trained on first use) as a judge."""
    module = optional_module("reward_model")
    if task.reward_model is None:
        s = task.sizes
        task.log("      training the reward model on the pairs")
        task.reward_model = module.train_reward_model(
            task.sft_dir, task.pairs_path, str(task.out / "reward_model"), steps=s.reward_model_steps,
            lr=s.reward_model_lr, batch_size=s.batch_size, seed=s.demo.seed, threads=task.threads, log=task.log)
    return module.reward_model_judge(task.reward_model)


def ppo_sweep(task: Task, method: str, reward, coefs: tuple[float, ...] | None = None, seed: int | None = None,
              knob: dict | None = None) -> list[dict]:
    """PPO against `reward` at each KL coefficient (default: the sizes'), trained with `seed` (default: the
    task's); a point each, its knob `knob` plus the coefficient."""
    from dpokit.api import load_model

    ppo, s, points = optional_module("ppo"), task.sizes, []
    seed = s.demo.seed if seed is None else seed
    for coef in s.ppo_kl_coefs if coefs is None else coefs:
        name = f"kl-{coef:g}" + (f"-seed-{seed}" if seed != s.demo.seed else "")
        path = ppo.train_ppo(task.sft_dir, reward, task.train_prompts, str(task.out / method / name),
                             kl_coef=coef, target_kl=None, steps=s.ppo_steps, batch_size=s.ppo_batch_size,
                             ppo_epochs=s.ppo_epochs, lr=s.ppo_lr, max_new_tokens=s.demo.max_new_tokens,
                             temperature=s.demo.temperature, seed=seed, threads=task.threads,
                             log=lambda *_: None)  # a line per PPO step would bury the sweep's progress
        rollouts = s.ppo_steps * s.ppo_batch_size
        spent = cost(rollouts, rollouts) if method == "ppo-gt" else cost(rollouts, task.pair_samples, rollouts)
        points.append(measure(task, load_model(path), method, {**(knob or {}), "kl_coef": coef}, spent, model=path))
    return points


def ppo_points(task: Task) -> list[dict]:
    """PPO against the reward model learned from the pairs, at each KL coefficient."""
    return ppo_sweep(task, "ppo", learned_reward(task))


def ppo_gt_points(task: Task) -> list[dict]:
    """PPO against the ground-truth reward (the judge itself), at each KL coefficient."""
    return ppo_sweep(task, "ppo-gt", task.judge)


def best_of_n_bound(n: int) -> float:
    """KL(best-of-N ‖ π_ref) ≤ log N − (N−1)/N (exact for continuous rewards; Stiennon et al. 2020)."""
    return math.log(n) - (n - 1) / n


def best_of_n_points(task: Task) -> list[dict]:
    """Best-of-N of π_ref under the learned reward model, scored by the judge; KL: the analytic bound."""
    module, s, demo, points = optional_module("best_of_n"), task.sizes, task.sizes.demo, []
    reward = learned_reward(task)
    prompts = task.held_out[: s.best_of_n_prompts]
    for n in s.best_of_n:
        texts = module.best_of_n(task.reference, task.tokenizer, prompts, n, reward,
                                 max_new_tokens=demo.max_new_tokens, temperature=demo.temperature,
                                 seed=demo.seed + 10, batch_size=32 * max(1, min(n, 8)))
        scores = task.judge([p + t for p, t in zip(prompts, texts)])
        points.append({"method": "best-of-n", "knob": {"n": n}, **reward_summary(scores), "kl": best_of_n_bound(n),
                       "kl_estimate": "analytic bound log N - (N-1)/N",
                       **cost(n * len(prompts), task.pair_samples, n * len(prompts)), "scores": scores})
        task.log(f"      best-of-n N={n}: reward {points[-1]['reward']:.3f}, KL ≤ {points[-1]['kl']:.2f}")
    return points


# method -> (function giving its points, the dpokit.experiments.paper modules it needs)
POINTS: dict[str, tuple[Callable[[Task], list[dict]], tuple[str, ...]]] = {
    "dpo": (dpo_points, ()),
    "preferred-ft": (preferred_ft_points, ()),
    "unlikelihood": (unlikelihood_points, ()),
    "dpo-online": (lambda task: optional_module("online").dpo_online_points(task, "learned"),
                   ("reward_model", "online")),
    "dpo-online-gt": (lambda task: optional_module("online").dpo_online_points(task, "ground-truth"), ("online",)),
    "ppo": (ppo_points, ("reward_model", "ppo")),
    "ppo-gt": (ppo_gt_points, ("ppo",)),
    "best-of-n": (best_of_n_points, ("reward_model", "best_of_n")),
}
