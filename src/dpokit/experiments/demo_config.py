"""The settings of `dpokit demo` (one dataclass, each field a flag), apart from the demo itself so that the
command line can list and check them without loading torch."""

from __future__ import annotations

from dataclasses import dataclass

from dpokit.errors import ConfigError
from dpokit.experiments.iterate_config import RoundSettings


@dataclass
class DemoConfig:
    """Every size and setting of the demo; each is a `dpokit demo` flag."""

    output: str = "runs/demo"
    model: str | None = None  # default: the embedded base model
    judge: str = "vader"
    seed: int = 0
    sft_reviews: int = 2000
    sft_steps: int = 60
    sft_lr: float = 3e-4
    prompts: int = 256
    completions: int = 4
    labeling: str = "argmax"
    min_score_gap: float = 0.1
    bt_scale: float = 10.0
    dpo_steps: int = 150
    beta: float = 0.1
    lr: float = 1e-4
    batch_size: int = 16
    eval_prompts: int = 128
    eval_samples: int = 2
    max_new_tokens: int = 32
    temperature: float = 1.0
    examples_shown: int = 5
    threads: int = 0  # torch CPU threads; 0: dpokit.runtime.threads chooses

    def __post_init__(self) -> None:
        if self.labeling not in ("argmax", "bradley-terry"):
            raise ConfigError(f"--labeling must be argmax or bradley-terry; got {self.labeling!r}")
        if self.completions < 2:
            raise ConfigError("--completions must be at least 2 to form pairs")
        if self.threads < 0:
            raise ConfigError(f"--threads must be at least 1 (0: automatic); got {self.threads}")
        for name in ("prompts", "eval_prompts", "eval_samples", "sft_steps", "dpo_steps", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")

    def round_settings(self) -> RoundSettings:
        """The demo's one round of iterative DPO (dpokit.experiments.iterate): its sampling, labelling and DPO settings."""
        return RoundSettings(samples_per_prompt=self.completions, labeling=self.labeling,
                             min_score_gap=self.min_score_gap, bt_scale=self.bt_scale, beta=self.beta, lr=self.lr,
                             steps=self.dpo_steps, batch_size=self.batch_size, warmup_steps=10,
                             eval_samples=self.eval_samples, max_new_tokens=self.max_new_tokens,
                             temperature=self.temperature, max_length=128, max_prompt_length=16)
