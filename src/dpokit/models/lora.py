"""LoRA and QLoRA with peft: a trainable adapter on a frozen (optionally 4-/8-bit) base, and its reference.

The reference of a LoRA run lives in the same weights, so it costs no second copy of the model:

* a **fresh** adapter (``--lora-r`` on a full model): the reference is the base model with the adapter
  disabled, which is exactly the policy at step 0;
* a run that **starts from an adapter** (``--model`` is an adapter directory, e.g. an SFT LoRA): the policy at
  step 0 is base + that adapter, so the reference is that adapter's starting state, loaded as a frozen second
  adapter named ``reference`` (``--ref-adapter`` picks another one). Disabling the adapter would silently
  compare against the bare base instead; dpokit never does that.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dpokit.errors import ConfigError

if TYPE_CHECKING:  # torch is imported only when a model is touched: config checks stay fast
    from torch import nn

REFERENCE_ADAPTER = "reference"


def adapter_base(path: str | Path) -> str:
    """The base model an adapter directory was trained on (``base_model_name_or_path``)."""
    config = json.loads((Path(path) / "adapter_config.json").read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{path}/adapter_config.json: no base_model_name_or_path; cannot tell which model it adapts")
    return base


@dataclass
class LoraOptions:
    """A fresh adapter's shape: rank, scaling numerator, dropout, the modules it adapts and those it trains in
    full, and its variant (DoRA, rank-stabilised scaling)."""

    r: int
    alpha: float
    dropout: float = 0.0
    target_modules: list[str] | None = None  # None: every linear layer of the decoder
    modules_to_save: list[str] | None = None  # trained in full and saved with the adapter
    use_dora: bool = False
    use_rslora: bool = False
    exclude_modules: str | None = None  # a regular expression of module names kept without LoRA (a VLM's vision tower)


def _linear_names(model: nn.Module) -> list[str]:
    from torch import nn

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and module is not head}
    return sorted(names)


def add_adapter(model: nn.Module, options: LoraOptions) -> nn.Module:
    """`model` with a fresh trainable LoRA adapter named ``default``; the base weights are frozen."""
    from peft import LoraConfig, get_peft_model

    targets = options.target_modules or "all-linear"
    suffixes = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for flag, names in (("--lora-target-modules", options.target_modules),
                        ("--lora-modules-to-save", options.modules_to_save)):
        missing = [t for t in names or () if t not in suffixes]
        if missing:
            raise ConfigError(f"{flag}: {type(model).__name__} has no module named {', '.join(missing)} (its linear "
                              f"layers: {', '.join(_linear_names(model))})")
    config = LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                        target_modules=targets, modules_to_save=options.modules_to_save, use_dora=options.use_dora,
                        use_rslora=options.use_rslora, exclude_modules=options.exclude_modules, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as error:
        raise ConfigError(f"cannot add a LoRA adapter to {type(model).__name__}: {error}") from None


def load_adapter(base: nn.Module, path: str | Path, *, trainable: bool) -> nn.Module:
    """`base` with the adapter saved in `path` as its ``default`` adapter."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(path), is_trainable=trainable)


def add_reference_adapter(model: nn.Module, path: str | Path) -> None:
    """Load the adapter in `path` as a frozen second adapter, the reference of a run that starts from one."""
    model.load_adapter(str(path), adapter_name=REFERENCE_ADAPTER, is_trainable=False)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and f".{REFERENCE_ADAPTER}." in n]
    if trainable:
        raise RuntimeError(f"the reference adapter has trainable weights: {trainable[:3]}")


def _tuner_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()  # an adapter's own dropout must not act on the reference
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[None]:
    """Inside: `model` computes as its base model (the reference of a fresh adapter)."""
    with _eval_mode(model), model.disable_adapter():
        yield


@contextlib.contextmanager
def reference_adapter(model: nn.Module) -> Iterator[None]:
    """Inside: `model` computes with the frozen ``reference`` adapter in place of the trained one.

    Only which adapter each layer applies is switched; no parameter's ``requires_grad`` changes, so engines
    that registered hooks on the trainable parameters are not disturbed.
    """
    layers = _tuner_layers(model)
    saved = [layer._active_adapter for layer in layers]
    with _eval_mode(model):
        try:
            for layer in layers:
                layer._active_adapter = [REFERENCE_ADAPTER]
            yield
        finally:
            for layer, active in zip(layers, saved):
                layer._active_adapter = active


def trained_adapter_weight(name: str) -> bool:
    """Whether a state-dict key belongs to the trained (``default``) adapter, which the reference never uses."""
    return ".default." in name


def merge_adapter(model: nn.Module) -> nn.Module:
    """The base model with the ``default`` adapter folded into its weights (a plain Hugging Face model)."""
    return model.merge_and_unload()
