"""A model directory's files checked before anything is loaded: each problem one line that names the file and the
fix, instead of a traceback from deep inside transformers or safetensors after the data was prepared.

Checked: config.json readable, weights present (a single file, or every shard a sharded index names), every
safetensors file whole (its header read, and the file as long as the header says), an adapter's base model
present, and a tokenizer no larger than the model's vocabulary. Reads headers only: no weights are loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

from dpokit.errors import ConfigError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def read_json(path: Path) -> dict:
    """A JSON object from `path`, or a one-line ConfigError naming the file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path}: not a readable JSON file ({error}); the model directory is damaged: save or "
                          "download the model again") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object; the model directory is damaged")
    return data


def check_safetensors(path: Path) -> None:
    """Refuse a truncated or corrupt safetensors file (its header and length are checked; nothing is loaded)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np"):
            pass
    except (SafetensorError, OSError) as error:
        reason = str(error).removeprefix("Error while deserializing header: ")
        raise ConfigError(f"{path}: truncated or corrupt safetensors file ({reason}); copy or download it again")


def _check_weights(directory: Path) -> None:
    for index_name in INDEX_FILES:
        index = directory / index_name
        if index.is_file():
            shards = sorted(set(read_json(index).get("weight_map", {}).values()))
            missing = [name for name in shards if not (directory / name).is_file()]
            if missing:
                raise ConfigError(f"{index}: names {len(missing)} shard(s) that are missing ({', '.join(missing[:3])})"
                                  "; copy or download the whole model again")
            for name in shards:
                if name.endswith(".safetensors"):
                    check_safetensors(directory / name)
            return
    present = [directory / name for name in WEIGHT_FILES if (directory / name).is_file()]
    if not present:
        raise ConfigError(f"{directory}: a config.json but no weights ({' or '.join(WEIGHT_FILES)}, or a sharded "
                          f"index); save the model with save_pretrained, or give the directory that holds them")
    if present[0].suffix == ".safetensors":
        check_safetensors(present[0])


def check_model_files(path: str, *, gguf_file: str | None = None) -> None:
    """Check the files of a local model or adapter directory (a Hub name is left to the loader). For an adapter,
    its own weights and its base model are checked."""
    directory = Path(path).expanduser()
    if not directory.is_dir() or gguf_file is not None:
        return  # a Hub name, or a GGUF file checked by its own loader
    adapter_config = directory / "adapter_config.json"
    if adapter_config.is_file():
        _check_adapter(directory, read_json(adapter_config))
        return
    read_json(directory / "config.json")
    _check_weights(directory)


def _check_adapter(directory: Path, config: dict) -> None:
    for name in ADAPTER_WEIGHTS:
        if (directory / name).is_file():
            if name.endswith(".safetensors"):
                check_safetensors(directory / name)
            break
    else:
        raise ConfigError(f"{directory}: an adapter_config.json but no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")
    base = config.get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{directory / 'adapter_config.json'}: no base_model_name_or_path; set it to the model "
                          "the adapter was trained on")
    from dpokit.data.validation import check_model_spec

    try:
        check_model_spec("base model", base)
    except ConfigError as error:
        raise ConfigError(f"{directory}: the adapter's base model is missing ({error}); put the base model back at "
                          f"{base} or set base_model_name_or_path in adapter_config.json") from None
    check_model_files(base)


def check_vocabulary(tokenizer_size: int, model_path: str) -> None:
    """Refuse a tokenizer with more tokens than the model has embedding rows: its ids past the vocabulary would
    index outside the embedding. (Fewer is normal: vocabularies are padded.) A model whose config cannot be read
    here is left to the loader."""
    directory = Path(model_path).expanduser()
    if not (directory / "config.json").is_file():
        return
    config = read_json(directory / "config.json")
    vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    if isinstance(vocab, int) and tokenizer_size > vocab:
        raise ConfigError(f"{directory}: its tokenizer has {tokenizer_size} tokens but the model's vocabulary has "
                          f"{vocab} (config.json vocab_size): the tokenizer belongs to another model; save the "
                          "tokenizer the model was trained with into this directory")
