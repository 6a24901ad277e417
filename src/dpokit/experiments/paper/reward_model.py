"""The reward model of the DPO paper's PPO baseline (§6.1), fitted to the preference pairs by `dpokit reward`.

The PPO and Best-of-N baselines need r(x, y) learned from the same pairs DPO trains on. It is trained by the one
reward-model loop users run (dpokit.train.reward.train_reward: ``AutoModelForSequenceClassification`` with one
output, its trunk from the SFT model, a fresh score head, the Bradley–Terry loss of dpokit.losses), not by a loop
of its own, so the baseline's reward model is the one `dpokit reward` would give on the same pairs.
:func:`reward_model_judge` scores full texts with it, tokenised as it was trained (the text as a prompt, EOS
appended), and returns the raw scalar.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from dpokit.judges.pointwise import Judge


def train_reward_model(sft_dir: str, pairs_path: str, output: str, *, steps: int = 100, lr: float = 1e-4,
                       batch_size: int = 16, seed: int = 0, threads: int | None = None,
                       log: Callable[[str], None] = print, eval_fraction: float = 0.1, max_length: int = 128,
                       max_prompt_length: int = 16, weight_decay: float = 0.0) -> str:
    """Fit a reward model to the pairs in `pairs_path` (JSONL prompt/chosen/rejected, as the demo's pairs.jsonl)
    from the SFT model in `sft_dir` with `dpokit reward` (AdamW, `steps` steps of `batch_size` pairs at `lr`, no
    warm-up); return the path of the final model (OUTPUT/final). `eval_fraction` of the pairs (seeded) is held
    out and the reward model's accuracy on them logged (0: none held out)."""
    from dpokit.config.reward import RewardConfig
    from dpokit.train.reward import train_reward

    config = RewardConfig(model=sft_dir, data=pairs_path, output=output, max_steps=steps, lr=lr, warmup_steps=0,
                          batch_size=batch_size, weight_decay=weight_decay, seed=seed, threads=threads,
                          eval_fraction=eval_fraction, max_length=max_length, max_prompt_length=max_prompt_length,
                          save_every_minutes=0, overwrite=True, data_cache=False, log_every=max(1, steps // 10))
    metrics = train_reward(config)
    if "accuracy" in metrics:
        log(f"reward model: held-out pairwise accuracy {metrics['accuracy']:.3f} after {steps} steps")
    return str(Path(output) / "final")


def reward_model_judge(path: str, batch_size: int = 32) -> Judge:
    """A judge returning the reward model at `path`'s raw scalar r(text) for each full text, tokenised as it was
    trained (``dpokit.judges.pointwise.reward_judge`` with ``append_eos``)."""
    from dpokit.errors import ConfigError
    from dpokit.judges.pointwise import reward_judge

    if batch_size < 1:  # checked here too, so that the error names this judge
        raise ConfigError(f"reward model judge: batch_size must be >= 1, got {batch_size}")
    judge = reward_judge(path, batch_size=batch_size, append_eos=True)
    judge.__name__ = f"reward:{path}"
    return judge
