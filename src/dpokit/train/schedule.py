"""The run's schedule: how many examples a step takes and how many steps there are (:class:`Plan`), which
examples each step reads, the learning rate of each step, and warnings about a schedule that does not do what its
options suggest. Pure functions of the config and the data size: every process computes the same schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dpokit.config import TrainConfig
from dpokit.errors import ConfigError


@dataclass
class Plan:
    """How many examples each step consumes and how many steps the run has."""

    global_batch: int
    steps_per_epoch: int
    total_steps: int


def make_plan(num_examples: int, config: TrainConfig, num_processes: int) -> Plan:
    """Work out the global batch and step counts; too little data for one global batch, or an --epochs that
    leaves no whole step, is an error."""
    global_batch = config.batch_size * config.grad_accum * num_processes
    steps_per_epoch = num_examples // global_batch
    if steps_per_epoch == 0:
        raise ConfigError(
            f"{num_examples} training examples are fewer than one global batch of {global_batch} "
            f"(batch_size {config.batch_size} x grad_accum {config.grad_accum} x {num_processes} processes)"
        )
    total = config.max_steps or math.floor(config.epochs * steps_per_epoch)
    if total == 0:
        raise ConfigError(f"--epochs {config.epochs} of {steps_per_epoch} steps per epoch (global batch {global_batch}) "
                          f"is less than one step; give at least --epochs {1 / steps_per_epoch:.3g}, or --max-steps")
    return Plan(global_batch, steps_per_epoch, total)


def warmup_steps(config: TrainConfig, total_steps: int) -> int:
    """The warm-up length in steps: --warmup-ratio of the run (rounded up, as transformers does), else
    --warmup-steps."""
    if config.warmup_ratio is not None:
        return math.ceil(config.warmup_ratio * total_steps)
    return config.warmup_steps


def schedule_warnings(plan: Plan, config: TrainConfig, eval_examples: int) -> list[str]:
    """Warnings about a schedule that does not do what its options suggest, for the log before training starts:
    a warm-up as long as the run, intervals past its end, evaluation asked for without evaluation data."""
    total, warmup = plan.total_steps, warmup_steps(config, plan.total_steps)
    lines = []
    if warmup >= total and warmup > 0:
        lines.append(f"warning: the warm-up ({warmup} steps) is not shorter than the run ({total} steps): the "
                     f"learning rate rises to only {100 * total / warmup:.3g}% of --lr {config.lr:g} at the last step"
                     + (" and the cosine decay never starts" if config.schedule == "cosine" else "")
                     + "; lower --warmup-steps or give --warmup-ratio")
    if config.eval_every and not eval_examples:
        lines.append(f"warning: --eval-every {config.eval_every} but there is no evaluation data (--eval-data or "
                     "--eval-fraction): nothing is evaluated")
    elif config.eval_every > total:
        lines.append(f"warning: --eval-every {config.eval_every} is past the end of the run ({total} steps): "
                     "evaluation happens once, after the last step")
    if config.save_every > total:
        lines.append(f"warning: --save-every {config.save_every} is past the end of the run ({total} steps): "
                     "only the final checkpoint (and those by --save-every-minutes) is written")
    if config.log_every > total:
        lines.append(f"warning: --log-every {config.log_every} is past the end of the run ({total} steps): only "
                     "the last step is logged")
    return lines


def step_indices(step: int, plan: Plan, num_examples: int, seed: int) -> list[int]:
    """The example indices of global step `step`: a seeded permutation per epoch, read in order."""
    epoch, position = divmod(step, plan.steps_per_epoch)
    order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed + epoch))
    start = position * plan.global_batch
    return order[start : start + plan.global_batch].tolist()


def lr_factor(step: int, config: TrainConfig, total_steps: int) -> float:
    """Linear warm-up over :func:`warmup_steps`, then constant or cosine decay to zero."""
    warmup = warmup_steps(config, total_steps)
    if warmup and step < warmup:
        return (step + 1) / warmup
    if config.schedule == "cosine":
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 1.0
