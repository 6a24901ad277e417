"""Every option of every command, declared once as a dataclass field (dpokit.config.options): the pieces (model,
LoRA, data, tokenisation, loss, reference, optimisation, run, runtime) and the config of each command composed
from them. Imports nothing from the rest of dpokit but its errors."""

from dpokit.config.model import is_adapter_dir
from dpokit.config.options import Default
from dpokit.config.train import TrainConfig

__all__ = ["Default", "TrainConfig", "is_adapter_dir"]
