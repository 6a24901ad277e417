"""The policy DPO aims at, computed: π*_β(y|x) = π_ref(y|x)·exp(r(x, y)/β)/Z(x), the optimum of the KL-regularised
objective (the DPO paper's eq. 4), for a reward r, and where it sits on the reward–KL plane.

On the tiny model it is computable by sampling. For each prompt, M samples y_1..y_M of π_ref and their rewards give
self-normalised importance weights w_i = exp(r_i/β) / Σ_j exp(r_j/β) (the weights of π*_β relative to π_ref), so

* KL(π*_β ‖ π_ref) = E_π*[r/β] − log Z ≈ Σ_i w_i·log(M·w_i), and
* π*_β's expected ground-truth reward ≈ Σ_i w_i·g_i (g: the judge's score of the same samples),

averaged over prompts. The estimate cannot exceed log M nats per prompt (all weight on one sample): where the
effective sample size 1/Σ w_i² falls to a few samples it is a lower bound, and each point reports that size.

With r the reward model learned from the pairs this is the optimum DPO's trained policies approach as they
converge (DPO fits the same Bradley–Terry reward implicitly); with r the judge itself it is the best reward any
method can reach at that KL from π_ref's samples, the ceiling of the frontier.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from dpokit.experiments.paper.task import Task
from dpokit.judges.pointwise import Judge


def tilted(rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """Self-normalised weights of π_ref·exp(r/β) over each row of samples (prompts × M), in float64."""
    return torch.softmax(rewards.double() / beta, dim=-1)


def optimum_summary(rewards: torch.Tensor, truth: torch.Tensor, beta: float) -> dict:
    """KL(π*_β ‖ π_ref), π*_β's expected ground-truth reward and the mean effective sample size, estimated from
    the rewards `rewards` (prompts × M, the reward π*_β is tilted by) and the judge's scores `truth` of the same
    samples of π_ref."""
    weights = tilted(rewards, beta)
    m = rewards.shape[-1]
    kl = (weights * torch.log(weights * m).clamp_min(-1e300)).sum(-1)  # 0·log 0 = 0
    return {"beta": beta, "kl": kl.mean().item(), "reward": (weights * truth.double()).sum(-1).mean().item(),
            "effective_samples": (1 / (weights ** 2).sum(-1)).mean().item(), "kl_cap": math.log(m)}


def sample_rewards(task: Task, rewards: dict[str, Judge], prompts: Sequence[str], m: int,
                   seed: int) -> dict[str, torch.Tensor]:
    """M samples of π_ref per prompt, scored by each of `rewards` (name → judge over full texts): name → tensor of
    prompts × M scores."""
    from dpokit.experiments.iterate import sample_continuations

    settings = task.sizes.demo.round_settings()
    groups = sample_continuations(task.reference, task.tokenizer, list(prompts), m, settings, seed)
    texts = [p + x.text for p, group in zip(prompts, groups) for x in group]
    return {name: torch.tensor(judge(texts), dtype=torch.float64).view(len(prompts), m)
            for name, judge in rewards.items()}


def optimum_points(task: Task, learned: Judge, betas: Sequence[float], prompts: int, m: int) -> list[dict]:
    """For each β, the optimum under the learned reward model (``optimum-rm``: what DPO aims at) and under the
    judge (``optimum-gt``: the ceiling), on the first `prompts` held-out prompts with `m` samples of π_ref each;
    points in the frontier's form (method, knob, reward, kl) with their effective sample sizes."""
    held_out = task.held_out[:prompts]
    scores = sample_rewards(task, {"rm": learned, "gt": task.judge}, held_out, m, task.sizes.demo.seed + 20)
    points = []
    for name, method in (("rm", "optimum-rm"), ("gt", "optimum-gt")):
        for beta in betas:
            summary = optimum_summary(scores[name], scores["gt"], beta)
            points.append({"method": method, "knob": {"beta": beta}, "reward": summary["reward"],
                           "kl": summary["kl"], "kl_estimate": f"importance-weighted, {m} samples of π_ref per prompt",
                           "effective_samples": summary["effective_samples"], "kl_cap": summary["kl_cap"],
                           "prompts": len(held_out)})
            task.log(f"      {method} β={beta:g}: reward {summary['reward']:.3f}, KL {summary['kl']:.2f} "
                     f"(effective samples {summary['effective_samples']:.1f} of {m})")
    return points
