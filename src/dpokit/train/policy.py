"""The model training starts from and the model it leaves: the policy (full, a fresh LoRA adapter, or an adapter
directory trained further, its base quantized for QLoRA) with the switch to its LoRA reference, and `merge`,
which folds a trained adapter into its base."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel

from dpokit.config import TrainConfig
from dpokit.errors import ConfigError
from dpokit.models.fused_lora import fuse_lora_linears
from dpokit.models.gated_mlp import keep_less_in_gated_mlps
from dpokit.models.loading import load_model, load_tokenizer
from dpokit.models.vision import freeze_vision_tower, lora_exclusions
from dpokit.models.lora import LoraOptions, adapter_base, adapter_disabled, add_adapter, add_reference_adapter, merge_adapter, reference_adapter
from dpokit.config import is_adapter_dir
from dpokit.train.checkpoint import save_model_dir
from dpokit.train.engine import ReferenceState


def _names(text: str | None) -> list[str] | None:
    """A comma-separated list of module names (None when not given)."""
    return [name.strip() for name in text.split(",") if name.strip()] if text else None


def prepare_for_training(model: PreTrainedModel, *, quantized: bool, checkpointing: bool) -> None:
    """Make a loaded model ready to train: a quantized base prepared for k-bit training (peft), and either
    gradient checkpointing or the lean gated MLP (exact, so always on when checkpointing is off)."""
    if quantized:
        from peft import prepare_model_for_kbit_training

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    if checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    else:  # checkpointing recomputes the whole layer anyway; this is exact, so it is not optional
        keep_less_in_gated_mlps(model)


def load_policy(config: TrainConfig, device: torch.device | str, *, with_reference: bool = True
                ) -> tuple[PreTrainedModel, ReferenceState | None]:
    """The model to train: full, with a fresh LoRA adapter, or an adapter directory trained further (base
    quantized for QLoRA). Also returns how to switch a LoRA policy to its reference (None: no such reference;
    none is set up without `with_reference`)."""
    bits = 4 if config.load_in_4bit else 8 if config.load_in_8bit else None
    # Full fine-tuning keeps float32 master weights (bfloat16 is autocast); a LoRA base is frozen, so it is
    # stored in the training dtype itself (peft keeps the adapter's own weights in float32).
    dtype = config.dtype if config.uses_lora else "float32"
    model = load_model(config.model, dtype=dtype, trust_remote_code=config.trust_remote_code, bits=bits,
                       device=device, trainable_adapter=True, gguf_file=config.gguf_file)
    prepare_for_training(model, quantized=bits is not None, checkpointing=config.gradient_checkpointing)
    reference_state = None
    if not config.train_vision_tower:  # a VLM's vision tower stays as it is (dpokit.models.vision)
        freeze_vision_tower(model)
    if config.lora_r is not None:
        alpha = config.lora_alpha if config.lora_alpha is not None else 2 * config.lora_r
        exclude = None if config.train_vision_tower else lora_exclusions(model)
        model = add_adapter(model, LoraOptions(config.lora_r, alpha, config.lora_dropout,
                                               _names(config.lora_target_modules), _names(config.lora_modules_to_save),
                                               use_dora=config.use_dora, use_rslora=config.use_rslora,
                                               exclude_modules=exclude))
        reference_state = adapter_disabled if with_reference else None
    elif is_adapter_dir(config.model) and with_reference:
        add_reference_adapter(model, config.ref_adapter or config.model)
        reference_state = reference_adapter
    if config.uses_lora:
        fuse_lora_linears(model)  # exact up to rounding, and only where peft's forward would do the same
    if bits is None:
        model = model.to(device)
    return model, reference_state


def merge(adapter: str, output: str, *, dtype: str = "float32", log=print) -> Path:
    """Fold the LoRA adapter in `adapter` into its base model and save a plain Hugging Face model at `output`.

    The base is loaded unquantized in `dtype`, also for an adapter trained with QLoRA.
    """
    if not is_adapter_dir(adapter):
        raise ConfigError(f"{adapter}: not a LoRA adapter directory (no adapter_config.json)")
    tokenizer = load_tokenizer(adapter)
    merged = merge_adapter(load_model(adapter, dtype=dtype))
    path = save_model_dir(output, merged, tokenizer)
    log(f"merged {adapter} into {adapter_base(adapter)}: saved {path}")
    return path
