"""Vision-language models (``AutoModelForImageTextToText``: LLaVA, Qwen2-VL, ...): telling one from its config, its
processor, the multimodal trunk whose hidden states the log-probs read, and its vision tower, frozen by default.

The rest of dpokit sees a VLM as a causal LM whose batches carry image inputs (dpokit.data.vision): loading
(dpokit.models.loading) picks the auto class and attaches the processor to the tokenizer; log-probs
(dpokit.models.logprobs) run the trunk with the image inputs, in the shared-prompt and packed layouts where the model
takes them (:func:`vision_layout_obstacle`); the policy (dpokit.train.policy) freezes the vision tower and keeps LoRA
on the language model unless ``--train-vision-tower``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from dpokit.config import is_adapter_dir
from dpokit.errors import ConfigError
from dpokit.models.lora import adapter_base

# module names of vision towers across families (LLaVA, Qwen2-VL, Idefics, Gemma 3, ...)
VISION_TOWERS = ("vision_tower", "visual", "vision_model", "vision_encoder")
PROJECTORS = ("multi_modal_projector", "mm_projector", "connector")


def is_vision_model(path: str, *, trust_remote_code: bool = False, gguf_file: str | None = None) -> bool:
    """Whether the model at `path` (an adapter's base for an adapter directory) is a vision-language model: its
    config has a ``vision_config``. False when the config cannot be read here (loading will say why)."""
    from transformers import AutoConfig

    if gguf_file is not None:
        return False
    if is_adapter_dir(path):
        path = adapter_base(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, ImportError):
        return False
    return getattr(config, "vision_config", None) is not None


def import_part_classes(path: str, *, trust_remote_code: bool = False) -> None:
    """Import the modules of the classes that the vision-language model at `path` builds its parts from (its
    language model and vision tower: ``AutoModel`` of each sub-config), before the model itself is built.

    Why: under DeepSpeed ZeRO-3, transformers builds a model inside ``deepspeed.zero.Init``, which patches the
    ``__init__`` of every module class and restores the saved one when it exits. A VLM imports its language model's
    module lazily, inside its own ``__init__`` (``AutoModel.from_config``), so a class first defined inside that
    context gets back the ``__init__`` it had before the `kernels` decorator wrapped it (LlamaAttention's, which
    sets ``_kernel_funcs``): every model of that class built afterwards (the resident reference) then fails in
    its forward. Imported here, the classes are defined before any such context."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    for key in getattr(config, "sub_configs", {}):
        part = getattr(config, key, None)
        if part is not None and type(part) in MODEL_MAPPING:
            _ = MODEL_MAPPING[type(part)]  # the mapping imports the class's module on access


def load_processor(path: str, *, trust_remote_code: bool = False):
    """The processor of the vision-language model at `path` (an adapter directory's own, else its base's).

    transformers 5 builds some processors (Qwen2-VL's) with a video processor that needs torchvision; without it
    the processor is built from its image processor, tokenizer and chat template alone (images only, no videos)."""
    from transformers import AutoProcessor

    if is_adapter_dir(path) and not (Path(path) / "processor_config.json").exists() \
            and not (Path(path) / "preprocessor_config.json").exists():
        path = adapter_base(path)
    try:
        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ImportError, AttributeError, ValueError, TypeError) as error:
        processor = _images_only_processor(path, trust_remote_code)
        if processor is None:
            raise ConfigError(f"cannot load the processor of {path!r}: {type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else error!r}") from None
        return processor


def _images_only_processor(path: str, trust_remote_code: bool):
    """The processor class named by `path`'s processor_config.json, built without its video processor; None when
    the class takes none or the files do not say."""
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer

    config_file = Path(path) / "processor_config.json"
    name = json.loads(config_file.read_text()).get("processor_class") if config_file.exists() else None
    cls = getattr(transformers, name, None) if name else None
    if cls is None or "video_processor" not in cls.get_attributes():
        return None

    class ImagesOnly(cls):
        def check_argument_for_proper_class(self, argument_name, argument):
            return None if argument is None else super().check_argument_for_proper_class(argument_name, argument)

    ImagesOnly.__name__ = cls.__name__
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    template = Path(path) / "chat_template.jinja"
    chat_template = template.read_text() if template.exists() else getattr(tokenizer, "chat_template", None)
    return ImagesOnly(image_processor=AutoImageProcessor.from_pretrained(path), tokenizer=tokenizer,
                      video_processor=None, chat_template=chat_template)


def _unwrapped(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def multimodal_trunk(model: nn.Module) -> nn.Module:
    """The module that takes token ids with image inputs and gives the final hidden states (LlavaModel,
    Qwen2VLModel, ...: the ``model`` of a ``...ForConditionalGeneration``), LoRA layers included."""
    base = _unwrapped(model)
    trunk = getattr(base, "model", None)
    if trunk is None or not hasattr(trunk, "get_image_features"):
        raise ConfigError(f"{type(base).__name__}: cannot find its multimodal trunk (a .model with image features)")
    return trunk


def is_vision(model: nn.Module) -> bool:
    """Whether `model` (a loaded model, or a module wrapping one) is a vision-language model: it has a vision
    tower."""
    return any(name.rsplit(".", 1)[-1] in VISION_TOWERS for name, _ in model.named_modules())


def vision_layout_obstacle(model: nn.Module, examples: Sequence) -> str | None:
    """Why the vision-language `model` cannot take the shared-prompt or packed layout with images, or None when
    nothing known rules it out (dpokit.models.logprobs.check_layout then compares its log-probs with the plain
    layout's). Those layouts give each response its prompt's positions and a block mask; a model that derives its
    positions or its image tokens' attention from the token ids of a whole row cannot follow them:

    * multimodal rotary positions computed from the token ids (Qwen2-VL, Qwen2.5-VL: ``get_rope_index``), which
      in a shared row would number the responses one after the other;
    * per-token type ids (Gemma 3, PaliGemma: ``token_type_ids``) from which the model builds its own attention
      between image tokens, which the layout's block masks do not carry."""
    if any(callable(getattr(m, "get_rope_index", None)) for m in model.modules()):
        return ("its multimodal rotary positions are computed from the token ids of whole rows by get_rope_index, "
                "not taken from the layout's position ids")
    keys = sorted({key for e in examples for key in getattr(e, "per_token", {})})
    if keys:
        return f"its image tokens attend by per-token inputs ({', '.join(keys)}) that the layout's masks do not carry"
    return None


def vision_tower_names(model: nn.Module) -> list[str]:
    """The qualified names of `model`'s vision towers (empty for a text model)."""
    names = [name for name, _ in _unwrapped(model).named_modules() if name.rsplit(".", 1)[-1] in VISION_TOWERS]
    return [n for n in names if not any(n.startswith(other + ".") for other in names)]


def freeze_vision_tower(model: nn.Module) -> int:
    """Stop gradients to the vision tower's weights; returns how many parameters it froze."""
    base = _unwrapped(model)
    frozen = 0
    for name in vision_tower_names(base):
        for parameter in base.get_submodule(name).parameters():
            parameter.requires_grad_(False)
            frozen += parameter.numel()
    return frozen


def lora_exclusions(model: nn.Module) -> str | None:
    """A regular expression for peft's ``exclude_modules`` that keeps LoRA on the language model: off the vision
    tower and the projector that feeds its features to the language model (None: a text model)."""
    import re

    base = _unwrapped(model)
    names = vision_tower_names(base)
    if not names:
        return None
    names += [n for n, _ in base.named_modules() if n.rsplit(".", 1)[-1] in PROJECTORS]
    return "|".join(re.escape(n) + r"(\..*)?" for n in names)
