"""`dpokit reproduce dpo-vs-ppo`: why DPO does not dominate PPO on the miniature frontier, measured.

On the demo's controlled-sentiment task (dpokit.experiments.paper.task) the study runs, at today's data budget:

* offline DPO at each β of the sweep, trained to convergence (dpokit.experiments.paper.budget), the β values near
  the DPO/PPO crossing with several seeds;
* online DPO (dpokit.experiments.paper.online), its pairs labelled by the learned reward model and by the judge;
* PPO against the reward model learned from the pairs (several seeds) and PPO-GT against the judge;
* the optimum π_ref·exp(r/β)/Z under the learned reward and under the judge (dpokit.experiments.paper.optimum):
  where DPO's trained policies should land for each β, and the ceiling of every method;

then a **data-budget sweep**: pairs from ¼, ½, 2 and 4 × the training prompts, DPO to convergence and PPO against
a reward model refitted on each budget's pairs. study_report writes study.json, the figures and report.md, whose
verdict per KL band comes from bootstrap intervals of each method's frontier (dpokit.experiments.paper.frontier_stats).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from dpokit.errors import ConfigError
from dpokit.experiments.paper.budget import Convergence, converged_dpo_points
from dpokit.experiments.paper.frontier import frontier_contents
from dpokit.experiments.paper.methods import learned_reward, ppo_sweep
from dpokit.experiments.paper.task import (SIZES, Sizes, Task, budget_task, measure, optional_module, point_budget,
                                          prepare_task)


@dataclass(frozen=True)
class StudySizes:
    """Every size of the study: the task's (π_ref, pairs, evaluation, PPO and online DPO settings) and its own."""

    task: Sizes = field(default_factory=lambda: replace(SIZES["full"], eval_prompts=256, eval_samples=2))
    convergence: Convergence = field(default_factory=Convergence)
    betas: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0)  # DPO at today's budget, to convergence
    seeds: int = 3  # seeds of the configurations near the crossing (seeded_betas, seeded_kl_coefs)
    seeded_betas: tuple[float, ...] = (0.1, 0.25)
    kl_coefs: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3)  # PPO at today's budget (PPO-GT too)
    seeded_kl_coefs: tuple[float, ...] = (0.01, 0.03)
    budgets: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)  # × today's training prompts
    budget_betas: tuple[float, ...] = (0.1, 0.5)  # DPO at the other budgets
    budget_kl_coefs: tuple[float, ...] = (0.03, 0.3)  # PPO at the other budgets
    optimum_prompts: int = 128
    optimum_samples: int = 64
    target_se: float = 0.01  # points near a frontier are measured until their reward's s.e. is at most this
    se_cap: int = 8192  # ... or they have this many held-out samples (dpokit.experiments.paper.precision)


STUDY_SIZES = {
    "full": StudySizes(),
    "quick": StudySizes(task=replace(SIZES["quick"], eval_prompts=128, eval_samples=2, ppo_steps=16,
                                     online_betas=(0.1,), online_rounds=2, online_steps=30),
                        convergence=Convergence(max_steps=200, eval_every=20, patience=2, measure_every=40),
                        betas=(0.1, 0.5, 2.0), seeds=2, seeded_betas=(0.1,), kl_coefs=(0.03, 0.3),
                        seeded_kl_coefs=(0.03,), budgets=(0.5, 1.0, 2.0), budget_betas=(0.1,),
                        budget_kl_coefs=(0.03,), optimum_prompts=64, optimum_samples=32, target_se=0.02,
                        se_cap=1024),
    "tiny": StudySizes(task=replace(SIZES["tiny"], online_rounds=1),
                       convergence=Convergence(max_steps=4, eval_every=1, patience=1, eval_fraction=0.25,
                                               measure_every=2),
                       betas=(0.5,), seeds=2, seeded_betas=(0.5,), kl_coefs=(0.1,), seeded_kl_coefs=(0.1,),
                       budgets=(0.5, 1.0), budget_betas=(0.5,), budget_kl_coefs=(0.1,), optimum_prompts=4,
                       optimum_samples=4, target_se=1e-3, se_cap=8),
}


def _todays_points(task: Task, s: StudySizes, seed: int) -> tuple[list, dict]:
    """Every method at today's budget, with its seconds."""
    points, seconds, started = [], {}, time.monotonic()

    def lap(name: str) -> None:
        nonlocal started
        seconds[name] = seconds.get(name, 0.0) + time.monotonic() - started
        started = time.monotonic()

    knob = {"budget": 1.0}
    for k in range(s.seeds):
        for beta in s.betas if k == 0 else s.seeded_betas:
            points += converged_dpo_points(task, beta, seed + k, s.convergence, knob)
    lap("dpo")
    reward = learned_reward(task)
    lap("reward model")
    for k in range(s.seeds):
        points += ppo_sweep(task, "ppo", reward, s.kl_coefs if k == 0 else s.seeded_kl_coefs, seed + k,
                            {**knob, "seed": seed + k})
    lap("ppo")
    points += ppo_sweep(task, "ppo-gt", task.judge, s.kl_coefs, seed, {**knob, "seed": seed})
    lap("ppo-gt")
    online = optional_module("online")
    if online is not None:
        points += online.dpo_online_points(task, "learned") + online.dpo_online_points(task, "ground-truth")
        lap("dpo-online")
    from dpokit.experiments.paper.optimum import optimum_points

    points += optimum_points(task, reward, s.betas, s.optimum_prompts, s.optimum_samples)
    lap("optimum")
    return points, seconds


def _budget_points(base: Task, s: StudySizes, seed: int, say: Callable[[str], None]) -> tuple[list, dict]:
    """DPO (to convergence) and PPO (its reward model refitted) at every other data budget."""
    points, pairs = [], {1.0: _pair_count(base)}
    for budget in (b for b in s.budgets if b != 1.0):
        say(f"      budget {budget:g}×: {round(base.sizes.demo.prompts * budget)} training prompts")
        task = budget_task(base, budget, base.out / f"budget-{budget:g}")
        pairs[budget] = _pair_count(task)
        knob = {"budget": budget}
        for beta in s.budget_betas:
            points += converged_dpo_points(task, beta, seed, s.convergence, knob)
        points += ppo_sweep(task, "ppo", learned_reward(task), s.budget_kl_coefs, seed, {**knob, "seed": seed})
    return points, pairs


def _precision(task: Task, points: list[dict], reference: dict, s: StudySizes) -> dict:
    """Today's points near a frontier of the compared methods, then each other budget's near DPO's or PPO's,
    measured further until their standard error is within the target (dpokit.experiments.paper.precision)."""
    from dpokit.experiments.paper.precision import top_up

    today = [p for p in points if point_budget(p) == 1.0 and "model" in p]
    result = {"1": top_up(task, today, reference, s.target_se, s.se_cap)}
    for b in sorted({point_budget(p) for p in points} - {1.0}):
        mine = [p for p in points if point_budget(p) == b and "model" in p]
        result[f"{b:g}"] = top_up(task, mine, reference, s.target_se, s.se_cap, methods=("dpo", "ppo"))
    return result


def _pair_count(task: Task) -> int:
    return sum(1 for line in open(task.pairs_path) if line.strip())


def run_study(output: str, sizes: str | StudySizes = "full", *, seed: int = 0, threads: int | None = None,
              overwrite: bool = False, log: Callable[[str], None] = print) -> dict:
    """Run the study; write OUTPUT/study.json, the figures and report.md; return the study dict. OUTPUT is claimed
    as a sweep's is (dpokit.experiments.paper.frontier.run_frontier)."""
    from dpokit.train.rundir import claim_output

    if isinstance(sizes, str) and sizes not in STUDY_SIZES:
        raise ConfigError(f"--sizes must be one of {', '.join(STUDY_SIZES)}; got {sizes!r}")
    name, s = (sizes, STUDY_SIZES[sizes]) if isinstance(sizes, str) else ("custom", sizes)
    # a study's directory is held as a sweep's: everything in it but the lock counts as an earlier run
    with claim_output(output, resume=False, overwrite=overwrite, contents=frontier_contents, resumable=False):
        return _run_study(Path(output), name, s, seed, threads, log)


def _run_study(out: Path, name: str, s: StudySizes, seed: int, threads: int | None,
               log: Callable[[str], None]) -> dict:
    from dpokit.experiments.paper.frontier_report import machine
    from dpokit.experiments.paper.study_report import write_study

    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    def say(line: str) -> None:
        log(f"[{time.monotonic() - started:6.0f} s] {line}")

    say("[1/4] π_ref (the demo's SFT) and today's preference pairs")
    task = prepare_task(out, s.task, seed, threads, say, largest_budget=max(s.budgets))
    reference = measure(task, task.reference, "sft", {}, model=task.sft_dir)
    say("[2/4] every method at today's budget")
    points, seconds = _todays_points(task, s, seed)
    say("[3/4] the data-budget sweep")
    begun = time.monotonic()
    budget_points, pairs = _budget_points(task, s, seed, say)
    seconds["budgets"] = time.monotonic() - begun
    say(f"[4/4] more samples where a frontier is decided: standard errors ≤ {s.target_se:g}")
    begun = time.monotonic()
    precision = _precision(task, points + budget_points, reference, s)
    seconds["precision"] = time.monotonic() - begun
    study = {"points": points + budget_points, "reference": reference, "precision": precision,
             "pairs": {f"{b:g}": n for b, n in pairs.items()},
             "judge": task.sizes.demo.judge, "sizes": name, "config": json.loads(json.dumps(asdict(s))),
             "seed": seed, "seconds": {**seconds, "total": time.monotonic() - started}, "machine": machine()}
    write_study(out, study)
    say(f"done: {out / 'study.json'}, {out / 'report.md'}")
    return study
