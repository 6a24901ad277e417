"""dpokit: Direct Preference Optimization (Rafailov et al. 2023) for Hugging Face causal language models.

The public functions live in dpokit.api and are imported from there when first used, so that ``import dpokit``
(and the command line's ``--help``) does not import torch.
"""

__version__ = "0.2.0"

from dpokit.config import TrainConfig  # noqa: E402
from dpokit.config.eval import EvalConfig  # noqa: E402
from dpokit.errors import ConfigError, DataError, DpokitError  # noqa: E402

_API = ("train_dpo", "train_sft", "evaluate", "generate", "merge")


def __getattr__(name: str):
    """dpokit.train_dpo and the other public functions: dpokit.api's, imported on first use."""
    if name in _API:
        from dpokit import api

        return getattr(api, name)
    raise AttributeError(f"module 'dpokit' has no attribute {name!r}")


__all__ = ["TrainConfig", "EvalConfig", *_API, "ConfigError", "DataError", "DpokitError"]
