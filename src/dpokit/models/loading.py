"""Model loading, one way for every command: a model directory or hub name, or a PEFT adapter directory (its
base + the adapter), optionally quantized (bitsandbytes). The policy to train is assembled from it in
dpokit.train.policy."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel,
                          PreTrainedTokenizerBase)

from dpokit.errors import ConfigError
from dpokit.models.files import check_model_files, check_vocabulary
from dpokit.models.lora import adapter_base, load_adapter
from dpokit.models.vision import import_part_classes, is_vision_model, load_processor
from dpokit.data.vision import attach_processor
from dpokit.config import is_adapter_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def load_tokenizer(path: str, *, trust_remote_code: bool = False, gguf_file: str | None = None
                   ) -> PreTrainedTokenizerBase:
    """Load a tokenizer (from an adapter directory, or its base model when it has none; from a GGUF file's
    metadata when its directory holds no tokenizer files); a missing pad token becomes the EOS token (pads are
    masked out anyway). A failure names its cause: damaged model files, no tokenizer files, a missing package, a
    tokenizer larger than the model's vocabulary, or transformers' word."""
    check_model_files(path, gguf_file=gguf_file)  # first thing every command loads: before any data work
    model_dir = adapter_base(path) if is_adapter_dir(path) else path
    if is_adapter_dir(path) and not any((Path(path) / name).exists() for name in TOKENIZER_FILES):
        path = model_dir
    local = Path(path).is_dir()
    has_files = local and any((Path(path) / name).exists() for name in TOKENIZER_FILES)
    if local and not has_files and gguf_file is None:
        raise ConfigError(f"{path}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); save the tokenizer "
                          "into the model directory (tokenizer.save_pretrained)")
    kwargs = {"gguf_file": gguf_file} if gguf_file is not None and not has_files else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except ImportError as error:  # e.g. sentencepiece, protobuf or gguf not installed
        raise ConfigError(f"cannot load the tokenizer of {path!r}: a package is missing: {error}") from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        where = f"{path!r}" + (f" (GGUF file {gguf_file})" if kwargs else "")
        raise ConfigError(f"cannot load the tokenizer of {where}: {type(error).__name__}: "
                          f"{str(error).strip().splitlines()[0] if str(error).strip() else error!r}") from None
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"the tokenizer of {path!r} has no EOS token; dpokit appends EOS to responses")
    if gguf_file is None:
        check_vocabulary(len(tokenizer), model_dir)
    if is_vision_model(model_dir, trust_remote_code=trust_remote_code, gguf_file=gguf_file):
        processor = load_processor(path, trust_remote_code=trust_remote_code)
        tokenizer = processor.tokenizer  # the processor's own: its image tokens and padding side
        attach_processor(tokenizer, processor)  # dpokit.data.vision tokenises image pairs with it
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _quantization(bits: int | None, dtype: str):
    if bits is None:
        return None
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=DTYPES[dtype])


def model_max_positions(path: str, *, trust_remote_code: bool = False, gguf_file: str | None = None) -> int | None:
    """The maximum positions (``max_position_embeddings``, ``n_positions``) of a model, read from its config
    (an adapter's base model's); None when the config does not say or cannot be read here."""
    from transformers import AutoConfig

    if is_adapter_dir(path):
        path, gguf_file = adapter_base(path), None
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError, KeyError, ImportError):
        return None  # loading the model itself will report why
    config = getattr(config, "text_config", None) or config
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_model(path: str, *, dtype: str = "float32", trust_remote_code: bool = False, bits: int | None = None,
               device: torch.device | str | None = None, trainable_adapter: bool = False,
               gguf_file: str | None = None) -> PreTrainedModel:
    """Load a causal LM in `dtype`, in eval mode (dropout off): a model directory or hub name, or a PEFT adapter
    directory (its base model with the adapter). `bits` 4 or 8 quantizes the base with bitsandbytes. `gguf_file`
    loads the weights from that GGUF file in the `path` directory, dequantised (transformers + the gguf package).
    A vision-language model (its config has a ``vision_config``) loads with ``AutoModelForImageTextToText``."""
    check_model_files(path, gguf_file=gguf_file)
    if is_adapter_dir(path):
        base = load_model(adapter_base(path), dtype=dtype, trust_remote_code=trust_remote_code, bits=bits,
                          device=device)
        return load_adapter(base, path, trainable=trainable_adapter).eval()
    if is_vision_model(path, trust_remote_code=trust_remote_code, gguf_file=gguf_file):
        from transformers import AutoModelForImageTextToText

        import_part_classes(path, trust_remote_code=trust_remote_code)  # before ZeRO-3's zero.Init (see there)
        # the load leaves the random state as it found it: under ZeRO-3 transformers draws from it for a VLM (where
        # one process draws nothing), and a LoRA adapter initialised next would start elsewhere under each engine
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
            return _from_pretrained(AutoModelForImageTextToText, "a vision-language model", path, dtype=dtype,
                                    trust_remote_code=trust_remote_code, bits=bits, device=device, gguf_file=gguf_file)
    return _from_pretrained(AutoModelForCausalLM, "a causal language model", path, dtype=dtype,
                            trust_remote_code=trust_remote_code, bits=bits, device=device, gguf_file=gguf_file)


def load_reward_model(path: str, pad_token_id: int, *, dtype: str = "float32", trust_remote_code: bool = False,
                      bits: int | None = None, device: torch.device | str | None = None,
                      trainable_adapter: bool = False, gguf_file: str | None = None) -> PreTrainedModel:
    """Load a reward model in `dtype`, in eval mode: ``AutoModelForSequenceClassification`` with one output, from a
    reward model directory (`dpokit reward`'s final/), a LoRA adapter directory of one, or a causal LM directory,
    whose trunk it starts from under a fresh score head (transformers initialises it). ``config.pad_token_id`` is
    set to `pad_token_id` (the tokenizer's), so that each sequence is read at its last token that is not padding.
    The same checks and options as :func:`load_model`."""
    check_model_files(path, gguf_file=gguf_file)
    if is_adapter_dir(path):
        base = load_reward_model(adapter_base(path), pad_token_id, dtype=dtype, trust_remote_code=trust_remote_code,
                                 bits=bits, device=device)
        model = load_adapter(base, path, trainable=trainable_adapter).eval()
    else:
        model = _from_pretrained(AutoModelForSequenceClassification, "a reward model (sequence classifier)", path,
                                 dtype=dtype, trust_remote_code=trust_remote_code, bits=bits, device=device,
                                 gguf_file=gguf_file, num_labels=1)
    if model.config.num_labels != 1:
        raise ConfigError(f"{path}: a classifier with {model.config.num_labels} outputs; a reward model has one")
    model.config.pad_token_id = pad_token_id
    return model


def _from_pretrained(auto_class, kind: str, path: str, *, dtype: str, trust_remote_code: bool, bits: int | None,
                     device: torch.device | str | None, gguf_file: str | None, **extra) -> PreTrainedModel:
    """`auto_class`.from_pretrained of a model directory or hub name, quantized or from a GGUF file, its failures
    as one-line ConfigErrors naming `kind`."""
    kwargs = dict(extra)
    if bits is not None:
        kwargs.update(quantization_config=_quantization(bits, dtype), device_map={"": str(device or "cpu")})
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    try:
        with _quiet_load_report() if auto_class is AutoModelForSequenceClassification else contextlib.nullcontext():
            model = auto_class.from_pretrained(path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code,
                                               **kwargs)
    except ImportError as error:
        hint = " (pip install 'dpokit[gguf]')" if gguf_file is not None else ""
        raise ConfigError(f"cannot load {path!r}: a package is missing{hint}: {error}") from None
    except (OSError, ValueError) as error:
        where = f"{path!r}" + (f" (GGUF file {gguf_file})" if gguf_file else "")
        raise ConfigError(f"cannot load {kind} from {where}: {error}") from None
    if bits == 4:
        _plain_cpu_4bit(model)
    _keep_used_conversions(model)
    if gguf_file is not None:
        # transformers always dequantises GGUF into ordinary tensors but still marks the model as quantized,
        # which would refuse save_pretrained: the weights are plain, so the model is saved as a normal directory
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model.eval()


def _keep_used_conversions(model: torch.nn.Module) -> None:
    """Keep only the weight renamings that loading applied, which save_pretrained reverts to write the checkpoint's
    own names.

    Why: under DeepSpeed ZeRO-3, transformers (5.x) keeps every renaming its mapping for the model holds, used or
    not, where it otherwise keeps the used ones; reverting an unused one writes wrong names (a LLaVA's
    ``model.language_model.*`` saved as ``language_model.model.model.*``), and the saved model loads back with
    fresh weights. A no-op wherever transformers already kept only the used ones."""
    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        model._weight_conversions = [c for c in conversions if not hasattr(c, "was_used") or c.was_used()]


@contextlib.contextmanager
def _quiet_load_report():
    """transformers' warnings while loading (a causal LM's head unused and a fresh score head, when a reward model
    starts from one, are expected) kept to errors."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _plain_cpu_4bit(model: torch.nn.Module) -> None:
    """Keep bitsandbytes' 4-bit layers on their one dequantising path on CPU.

    bitsandbytes ≥ 0.50 repacks a 4-bit weight in place the first time it runs in eval mode without gradients on
    a CPU with AVX512-BF16 (the LoRA reference pass), storing its scales in bfloat16 from then on: the reference
    and every later policy pass would then compute with other numbers than the first, and layers narrower than a
    quantization block (64) fail to repack at all."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
