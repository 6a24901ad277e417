"""Enough held-out samples where the verdict is decided: the points near the frontier measured until their
reward's standard error is at most a target (issue 28: ≤ 0.01).

Every point is first measured on the sizes' held-out samples (a few hundred). A reward near 0.5 on VADER's scale
has a standard deviation of about 0.6, so its standard error at 512 samples is about 0.027: reaching 0.01 needs
some 4,000 samples. Measuring every point so would cost most of the study, and only the points on or near a
method's frontier (its upper hull, dpokit.experiments.paper.frontier_stats) decide the verdicts. So, once all
points exist, :func:`top_up` finds those near a hull whose standard error is above the target and draws further
samples of the same held-out prompts from the same policy (its directory is kept: the point's ``model``), with new
seeds, until the error is within the target or the cap is reached; then it looks again, since the hulls move.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from dpokit.experiments.paper.frontier_stats import COMPARED, se_check
from dpokit.experiments.paper.task import Task, held_out_draw, reward_summary

TOP_UP_SEED = 5000  # offset of the further draws' seeds from the task's (the first draw uses +10)


def needed(point: dict, target: float) -> int:
    """How many samples `point` needs in all for a standard error of `target`, from its samples' spread."""
    n, se = point["samples"], point.get("reward_se", 0.0)
    return n if se <= target else math.ceil(n * (se / target) ** 2)


def extend(task: Task, point: dict, samples: int, draw: int) -> None:
    """Add about `samples` further held-out samples of the point's policy (draw number `draw`), in place: its
    scores, KLs, reward, standard error, KL and sample count."""
    from dpokit.api import load_model

    policy = load_model(point["model"]) if point["method"] != "sft" else task.reference
    per_prompt = max(1, math.ceil(samples / len(task.held_out)))
    scores, kls = held_out_draw(task, policy, per_prompt, task.sizes.demo.seed + TOP_UP_SEED + draw)
    point["scores"] = point["scores"] + scores
    point["kls"] = point["kls"] + kls
    point.update(reward_summary(point["scores"]), kl=sum(point["kls"]) / len(point["kls"]))


def top_up(task: Task, points: Sequence[dict], reference: dict, target: float = 0.01, cap: int = 8192,
           methods: Sequence[str] = COMPARED, passes: int = 3) -> dict:
    """Measure the points near a hull of `methods` (and π_ref's point, every hull's start) further until their
    reward standard error is ≤ `target` or they have `cap` samples; up to `passes` passes, since each pass moves
    the hulls. Returns what was done: points topped up, samples added, and those left above the target (at the
    cap, or without a kept model)."""
    added, touched, draw = 0, set(), 0
    for _ in range(passes):
        check = se_check(points, reference, methods, limit=target)
        over = [p for p in points if p.get("reward_se", 0.0) > target and
                any(p["method"] == o["method"] and p["knob"] == o["knob"] for o in check["over"])]
        if reference.get("reward_se", 0.0) > target:
            over.append(reference)
        todo = [p for p in over if p.get("model") and p["samples"] < cap]
        if not todo:
            break
        for point in todo:
            draw += 1
            more = min(cap, needed(point, target)) - point["samples"]
            before = point["samples"]
            extend(task, point, more, draw)
            added += point["samples"] - before
            touched.add(id(point))
            task.log(f"      {point['method']} {point['knob']}: {point['samples']} samples, reward "
                     f"{point['reward']:.3f} ± {point['reward_se']:.3f}, KL {point['kl']:.2f}")
    final = se_check(points, reference, methods, limit=target)
    left = final["over"] + ([{"method": "sft", "knob": {}, "reward_se": reference["reward_se"]}]
                            if reference.get("reward_se", 0.0) > target else [])
    return {"target": target, "cap": cap, "topped_up": len(touched), "samples_added": added, "left_over": left,
            "near": final["near"]}
