"""The options of `dpokit reward`: RewardConfig, a Bradley–Terry reward model trained on preference pairs.

It is composed of the training pieces of dpokit.config.train where an option means the same (the model and its
LoRA, the data and its tokenisation, the optimisation, the run directory, the runtime), plus the reward model's
own: a per-pair margin column and the reward-centering coefficient (TRL's RewardConfig names). Its trackers
(TrackingOptions) and Hub upload (HubOptions) are dpo's. There is no loss,
β or reference. Three optimisation defaults are a reward model's, not DPO's (AdamW at 1e-5 without warm-up: a
fresh score head learns from the first step); their rules are the training options'.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dpokit.config.data import DataOptions, TokenizeOptions
from dpokit.config.hub import HubOptions
from dpokit.config.model import LoraOptions, ModelOptions
from dpokit.config.options import NON_NEGATIVE, Default, check_options, opt, same_as
from dpokit.config.tracking import TrackingOptions
from dpokit.config.train import OptimOptions, RunOptions, RuntimeOptions
from dpokit.errors import ConfigError


@dataclass
class RewardConfig(HubOptions, TrackingOptions, RunOptions, OptimOptions, LoraOptions, TokenizeOptions, DataOptions,
                   ModelOptions):
    """Everything `dpokit reward` takes. Field names are YAML keys and (with dashes) flags."""

    model: str = same_as(ModelOptions, "model", help="model to start from: a causal LM directory or hub name (its "
                         "trunk, under a fresh one-output score head), a reward model, or a LoRA adapter of one")
    lr: float = same_as(OptimOptions, "lr", default=1e-5)
    optimizer: str = same_as(OptimOptions, "optimizer", default="adamw")
    warmup_steps: int = same_as(OptimOptions, "warmup_steps", default=Default(0))
    layout: str = same_as(RuntimeOptions, "layout")
    attention: str = same_as(RuntimeOptions, "attention")
    forward_tokens: int | None = same_as(RuntimeOptions, "forward_tokens")
    gradient_checkpointing: bool = same_as(RuntimeOptions, "gradient_checkpointing")
    return_freed_memory: bool = same_as(RuntimeOptions, "return_freed_memory")
    threads: int | None = same_as(RuntimeOptions, "threads")
    log_samples: int = same_as(TrackingOptions, "log_samples", default=0,
                               help="not taken: a reward model generates no text, so no samples table is logged")
    margin_column: str | None = opt(None, "name of a column of per-pair margins m: the loss becomes "
                                    "−log σ(r_chosen − r_rejected − m) (TRL's margin; default: no margin)")
    center_rewards_coefficient: float | None = opt(None, "add this times the mean of (r_chosen + r_rejected)² to the "
                                                   "loss, so that rewards centre on 0 (TRL's "
                                                   "center_rewards_coefficient; default: none)", range=NON_NEGATIVE)

    def __post_init__(self) -> None:
        check_options(self)
        if self.warmup_ratio is not None and not self.is_default("warmup_steps"):
            raise ConfigError("--warmup-ratio and --warmup-steps exclude each other; give one")
        self.check_lengths()
        self.check_early_stopping()
        self.check_lora()
        if self.margin_column is not None and self.streaming:
            raise ConfigError("--margin-column is not supported with --streaming: the margins are read with the rows")
        if self.log_samples:
            raise ConfigError("--log-samples: a reward model generates no text to sample")
        self.check_tracking()  # a tracker asked for but not installed: before anything loads


def reward_model_dir(path: str | Path) -> Path:
    """The model directory of `path`: `path` itself, or the final model of a `dpokit reward` output directory
    (OUTPUT/final) when `path` holds no model of its own."""
    path = Path(path)
    own = (path / "config.json").is_file() or (path / "adapter_config.json").is_file()
    return path / "final" if not own and (path / "final").is_dir() else path


def is_reward_model_dir(path: str | Path) -> bool:
    """Whether `path` (or its final/, :func:`reward_model_dir`) holds a reward model, read from its config files
    alone: a sequence classifier with one output, or a LoRA adapter of one (peft's SEQ_CLS task)."""
    path = reward_model_dir(path)
    try:
        if (path / "adapter_config.json").is_file():
            return json.loads((path / "adapter_config.json").read_text()).get("task_type") == "SEQ_CLS"
        if not (path / "config.json").is_file():
            return False
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    classifier = any(str(a).endswith("ForSequenceClassification") for a in config.get("architectures") or ())
    return classifier and (config.get("num_labels") == 1 or len(config.get("id2label") or {}) == 1)
