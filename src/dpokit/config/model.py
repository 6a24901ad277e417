"""The options that say which model is loaded and how: the model itself, and a LoRA adapter on it."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from dpokit.config.options import FRACTION, POSITIVE, opt
from dpokit.errors import ConfigError


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

    @property
    def uses_lora(self) -> bool:
        """Whether the model trained is a LoRA adapter (fresh, or loaded from an adapter directory)."""
        return self.lora_r is not None or is_adapter_dir(self.model)

    def check_lora(self) -> None:
        """What the LoRA and quantization options need of each other, of --model and of --optimizer (a config
        with these options also has ModelOptions' and OptimOptions')."""
        adapter_model = is_adapter_dir(self.model)
        if self.lora_r is not None and adapter_model:
            raise ConfigError(f"--model {self.model} is already a LoRA adapter, which is trained further; "
                              "--lora-r adds a fresh adapter to a full model")
        if self.lora_r is None and not adapter_model:
            for name in ("lora_alpha", "lora_target_modules", "lora_modules_to_save", "use_dora", "use_rslora"):
                if getattr(self, name) not in (None, False):
                    raise ConfigError(f"--{name.replace('_', '-')} needs --lora-r (or an adapter directory as --model)")
        if self.load_in_4bit and self.load_in_8bit:
            raise ConfigError("--load-in-4bit and --load-in-8bit exclude each other")
        if (self.load_in_4bit or self.load_in_8bit) and self.lora_r is None and not adapter_model:
            raise ConfigError("quantized weights cannot be trained directly: add --lora-r (QLoRA) or start from "
                              "an adapter directory")
        if (self.load_in_4bit or self.load_in_8bit or self.optimizer.endswith("8bit")) \
                and importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("--load-in-4bit/--load-in-8bit and 8-bit optimizers need bitsandbytes: "
                              "pip install bitsandbytes")


def is_adapter_dir(path: str | Path) -> bool:
    """Whether `path` is a local PEFT adapter directory (it holds ``adapter_config.json``)."""
    return (Path(path) / "adapter_config.json").is_file()
