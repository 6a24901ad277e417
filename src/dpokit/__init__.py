"""dpokit: Direct Preference Optimization (Rafailov et al. 2023) for Hugging Face causal language models."""

__version__ = "0.2.0"

from dpokit.config import TrainConfig  # noqa: E402
from dpokit.config.eval import EvalConfig  # noqa: E402
from dpokit.errors import ConfigError, DataError, DpokitError  # noqa: E402


def train_dpo(config: TrainConfig) -> dict[str, float]:
    """Fine-tune with DPO (see dpokit.api.train_dpo)."""
    from dpokit.train.run import train_dpo as run

    return run(config)


def train_sft(config: TrainConfig) -> dict[str, float]:
    """Supervised fine-tuning (see dpokit.api.train_sft)."""
    from dpokit.train.run import train_sft as run

    return run(config)


def evaluate(config: EvalConfig, **kwargs) -> dict[str, float]:
    """Evaluate a policy against a reference without training (see dpokit.eval.evaluate.evaluate)."""
    from dpokit.eval.evaluate import evaluate as run

    return run(config, **kwargs)


def generate(model: str, prompts: list, **kwargs) -> list[list[str]]:
    """Sample continuations, or a chat model's replies: prompts are strings or lists of chat messages, rendered
    with the tokenizer's chat template when it has one (see dpokit.eval.generation.generate for the options)."""
    from dpokit.eval.generation import generate as run

    return run(model, prompts, **kwargs)


def merge(adapter: str, output: str, **kwargs):
    """Fold a LoRA adapter into its base model and save it (see dpokit.train.policy.merge)."""
    from dpokit.train.policy import merge as run

    return run(adapter, output, **kwargs)


__all__ = ["TrainConfig", "EvalConfig", "train_dpo", "train_sft", "evaluate", "generate", "merge", "ConfigError", "DataError", "DpokitError"]
