"""DPO trained to convergence, for the data-budget sweep of `dpokit reproduce dpo-vs-ppo`
(dpokit.experiments.paper.study).

"Converged" is a rule, not a step count: 10% of the pairs are held out, the held-out DPO loss (the implicit
reward's classification loss) is evaluated every ``eval_every`` steps, and the run ends once it has not improved
for ``patience`` evaluations in a row (``--early-stopping-patience``, dpokit.train.early_stop), or at ``max_steps``.
The converged policy is the checkpoint with the lowest held-out loss. Checkpoints along the run are measured too
(every ``measure_every`` steps, the best and the last), so a run also traces its path on the reward–KL plane.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from dpokit.experiments.paper.task import Task, measure


@dataclass(frozen=True)
class Convergence:
    """How a DPO run of the study is trained and measured."""

    max_steps: int = 600
    eval_every: int = 25
    patience: int = 3
    eval_fraction: float = 0.1
    measure_every: int = 50  # checkpoints measured along the run (the best and the last always are)


def held_out_losses(output: Path) -> dict[int, float]:
    """Step → held-out DPO loss of each evaluation of the run in `output` (its metrics.jsonl)."""
    from dpokit.train.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(output / "metrics.jsonl") if r["split"] == "eval"}


def train_to_convergence(task: Task, beta: float, seed: int, rule: Convergence, name: str) -> Path:
    """DPO of π_ref on the task's pairs at `beta` with data-order `seed` until the held-out loss stops improving;
    its checkpoints (one per evaluation) are in TASK.OUT/dpo/NAME."""
    from dpokit.api import train_dpo
    from dpokit.config import TrainConfig

    s, output = task.sizes, task.out / "dpo" / name
    train_dpo(TrainConfig(model=task.sft_dir, data=task.pairs_path, output=str(output), beta=beta, lr=s.dpo_lr,
                          optimizer="adamw", warmup_steps=10, max_steps=rule.max_steps, batch_size=s.batch_size,
                          seed=seed, eval_fraction=rule.eval_fraction, eval_every=rule.eval_every,
                          save_every=rule.eval_every, early_stopping_patience=rule.patience, save_every_minutes=0,
                          overwrite=True, data_cache=False, max_length=128, max_prompt_length=16,
                          precompute_ref=True, threads=task.threads))
    return output


def converged_dpo_points(task: Task, beta: float, seed: int, rule: Convergence, knob: dict) -> list[dict]:
    """DPO at `beta` trained to convergence (:func:`train_to_convergence`); a point per measured checkpoint, its
    knob `knob` plus β, the seed and the step; the converged one (lowest held-out loss) has ``converged: true``. A measured checkpoint keeps its weights
    (not its optimizer state), so that it can be measured further.
    Every point carries its held-out loss and the step the run stopped at."""
    from dpokit.api import load_model
    from dpokit.experiments.paper.baselines import checkpoint_dirs

    output = train_to_convergence(task, beta, seed, rule, f"beta-{beta:g}-seed-{seed}")
    losses = held_out_losses(output)
    best, stopped = min(losses, key=lambda step: (losses[step], step)), max(losses)
    points = []
    for step, path in checkpoint_dirs(output):
        if step % rule.measure_every == 0 or step in (best, stopped):
            point = measure(task, load_model(path), "dpo", {**knob, "beta": beta, "seed": seed, "step": step},
                            task.offline_cost(), model=path)
            points.append({**point, "converged": step == best, "held_out_loss": losses.get(step),
                           "stopped_at": stopped})
            # the weights stay for dpokit.experiments.paper.precision; the optimizer state (twice the model) goes
            for state in Path(path).glob("trainer_state*"):
                state.unlink()
        else:
            shutil.rmtree(path)
    task.log(f"      dpo β={beta:g} seed {seed}: converged at step {best} (held-out loss {losses[best]:.4f}), "
             f"stopped at {stopped}")
    return points
