"""The options that say which model is loaded and how: the model itself, and a LoRA adapter on it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dpokit.config.options import FRACTION, POSITIVE, opt


@dataclass
class ModelOptions:
    """The model to train or evaluate and how it is loaded."""

    model: str = opt(None, "policy to start from: a Hugging Face model directory or hub name", required=True)
    dtype: str = opt("float32", "training precision: float32, or bfloat16 mixed precision", choices=("float32", "bfloat16"))
    trust_remote_code: bool = opt(False, "allow model code from the model's repository to run")
    gguf_file: str | None = opt(None, "load --model from this GGUF file inside the --model directory (weights "
                                "dequantised; the trained model is saved as a Hugging Face directory)")
    train_vision_tower: bool = opt(False, "vision-language models: train the vision tower too (frozen by default; with "
                                   "--lora-r, LoRA adapts it and the projector too)")


@dataclass
class LoraOptions:
    """A LoRA adapter on the frozen model (peft), its base optionally quantized (QLoRA)."""

    lora_r: int | None = opt(None, "train a LoRA adapter of this rank on the frozen model (peft); the reference is "
                             "the model with the adapter disabled", range=POSITIVE)
    lora_alpha: float | None = opt(None, "LoRA scaling numerator α (scale α/r; default: 2 × --lora-r)", range=POSITIVE)
    lora_dropout: float = opt(0.0, "dropout on the LoRA adapter's input (the reference never sees it)", range=FRACTION)
    lora_target_modules: str | None = opt(None, "comma-separated module names to adapt (default: every linear "
                                          "layer of the decoder)")
    lora_modules_to_save: str | None = opt(None, "comma-separated module names trained in full and saved with the "
                                           "adapter (e.g. lm_head,embed_tokens when new tokens were added)")
    use_dora: bool = opt(False, "DoRA: a weight-decomposed adapter (a trained magnitude per output feature beside "
                         "the LoRA direction); needs --lora-r or an adapter --model")
    use_rslora: bool = opt(False, "rank-stabilised LoRA: scale the adapter by α/√r instead of α/r; needs --lora-r or "
                           "an adapter --model")
    load_in_4bit: bool = opt(False, "QLoRA: load the frozen base in 4-bit NF4 (bitsandbytes); needs --lora-r or an "
                             "adapter --model")
    load_in_8bit: bool = opt(False, "load the frozen base in 8-bit (bitsandbytes); needs --lora-r or an adapter --model")


def is_adapter_dir(path: str | Path) -> bool:
    """Whether `path` is a local PEFT adapter directory (it holds ``adapter_config.json``)."""
    return (Path(path) / "adapter_config.json").is_file()
