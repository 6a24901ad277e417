"""The paper's two baselines that learn from preference pairs without a reward model (§6):

* **Preferred-FT**: supervised fine-tuning on the chosen responses only (dpokit's SFT on the pairs file);
* **Unlikelihood** (Welleck et al. 2019): raise log p of the chosen response and, token by token, lower the
  probability of the rejected one (dpokit.losses.dispatch.unlikelihood_loss through dpokit.losses.objective.UnlikelihoodObjective).

Both run dpokit's one training loop (dpokit.api) and save checkpoints along the way, so that a sweep can place
each checkpoint on the reward–KL plane.
"""

from __future__ import annotations

from pathlib import Path

from dpokit.config import TrainConfig


def _config(model: str, pairs_path: str, output: str, *, steps: int, lr: float, batch_size: int, seed: int,
            save_every: int, threads: int | None, **extra) -> TrainConfig:
    # the sweep owns its output directory (overwrite) and makes its pairs afresh (no tokenised-data cache)
    return TrainConfig(model=model, data=pairs_path, output=output, max_steps=steps, lr=lr, batch_size=batch_size,
                       seed=seed, save_every=save_every, save_every_minutes=0, optimizer="adamw",
                       warmup_steps=min(10, steps // 4), overwrite=True, data_cache=False, max_length=128,
                       max_prompt_length=16, threads=threads, **extra)


def checkpoint_dirs(output: str | Path) -> list[tuple[int, str]]:
    """(step, model directory) of every checkpoint a run saved in `output`, by step (its final model is the
    last checkpoint's weights)."""
    from dpokit.train.checkpoint import checkpoint_step, checkpoints

    return [(checkpoint_step(path), str(path)) for path in checkpoints(output)]


def train_preferred_ft(sft_dir: str, pairs_path: str, output: str, *, steps: int, lr: float = 1e-4,
                       batch_size: int = 16, seed: int = 0, save_every: int = 0,
                       threads: int | None = None) -> list[tuple[int, str]]:
    """Preferred-FT: SFT of `sft_dir` on the chosen responses of `pairs_path` for `steps` steps, a checkpoint
    every `save_every` steps (and at the end); returns (step, model directory) of each checkpoint."""
    from dpokit.api import train_sft

    train_sft(_config(sft_dir, pairs_path, output, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                      save_every=save_every, threads=threads))
    return checkpoint_dirs(output)


def train_unlikelihood(sft_dir: str, pairs_path: str, output: str, *, steps: int, alpha: float = 1.0,
                       lr: float = 1e-4, batch_size: int = 16, seed: int = 0, save_every: int = 0,
                       threads: int | None = None) -> list[tuple[int, str]]:
    """Unlikelihood training of `sft_dir` on the pairs of `pairs_path` (weight `alpha` on the rejected tokens'
    unlikelihood) for `steps` steps, a checkpoint every `save_every` steps (and at the end); returns (step,
    model directory) of each checkpoint."""
    from dpokit.api import train_objective
    from dpokit.losses.objective import UnlikelihoodObjective

    config = _config(sft_dir, pairs_path, output, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                     save_every=save_every, threads=threads, reference_free=True)
    train_objective(config, "dpo", UnlikelihoodObjective(alpha))
    return checkpoint_dirs(output)
