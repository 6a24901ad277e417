"""What a model or data argument names, decided before anything is loaded: a local path, or a Hub name.

The rule (README, "Models and data: local paths and Hub names"):

* an existing path is used as it is;
* something that looks like a path and does not exist is an error naming it ("no such directory", "no such
  file"), never a Hub look-up: it starts with ``/``, ``./``, ``../`` or ``~``, holds a backslash or more than
  one ``/``, its first component is an existing directory (``runs/fnal`` when ``runs/`` exists), or it ends
  in a data-file or weights extension (``.jsonl``, ``.gguf``, ...);
* ``owner/name`` is a Hub repository (``name:config`` for data sets);
* a bare name (``pairs``, ``gpt2``) is neither: it is an error unless the local Hugging Face cache already
  holds that repository, so a typo does not spend a minute in network retries.

Only the standard library here: these checks run in the first fraction of a second of every command.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from dpokit.errors import ConfigError

SUPPORTED_EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv")
"""The data files dpokit reads (and directories written by `save_to_disk`)."""
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd"}
"""The compressed forms of the text formats (``pairs.jsonl.gz``), by last suffix: fsspec's codec names."""
TEXT_EXTENSIONS = (".jsonl", ".json", ".csv")  # those that can come compressed (Parquet compresses inside)
DATA_EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv", ".txt", ".tsv", ".arrow", ".gz", ".zip", ".bz2", ".xz",
                   ".zst")
WEIGHT_EXTENSIONS = (".gguf", ".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def data_format(path: str | Path) -> tuple[str, str | None]:
    """A data file's format suffix and its compression: ``pairs.jsonl.gz`` -> ``(".jsonl", "gzip")``,
    ``pairs.csv`` -> ``(".csv", None)``."""
    suffixes = [suffix.lower() for suffix in Path(path).suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        return (suffixes[-2] if len(suffixes) > 1 else ""), COMPRESSIONS[suffixes[-1]]
    return (suffixes[-1] if suffixes else ""), None


def unsupported_file_type(path: str | Path) -> str | None:
    """Why dpokit cannot read data file `path` (its type), or None when it can."""
    suffix, compression = data_format(path)
    if suffix in (TEXT_EXTENSIONS if compression else SUPPORTED_EXTENSIONS):
        return None
    name = "".join(Path(path).suffixes[-2:] if compression else Path(path).suffixes[-1:]) or "(no extension)"
    return (f"unsupported file type {name!r}; supported: {', '.join(SUPPORTED_EXTENSIONS)}, the first three "
            f"compressed ({', '.join(COMPRESSIONS)}), or a directory written by save_to_disk")


def looks_like_path(text: str, extensions: tuple[str, ...] = DATA_EXTENSIONS + WEIGHT_EXTENSIONS) -> bool:
    """Whether `text` is clearly meant as a local path (see the module docstring), whether or not it exists."""
    if Path(text).suffix.lower() in extensions:
        return True
    if text.startswith(("/", "./", "../", "~", ".\\")) or "\\" in text or text.count("/") > 1 or text in (".", ".."):
        return True
    first = text.split("/", 1)[0]
    return "/" in text and Path(first).is_dir()


def hub_cache_dirs() -> list[Path]:
    """The local Hugging Face caches, as huggingface_hub and datasets place them (environment variables first)."""
    home = Path(os.environ.get("HF_HOME", Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"))
    hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or home / "hub"
    datasets = os.environ.get("HF_DATASETS_CACHE") or home / "datasets"
    return [Path(hub).expanduser(), Path(datasets).expanduser()]


def in_hub_cache(name: str, kind: str) -> bool:
    """Whether the local cache holds the Hub repository `name` of `kind` ("model" or "dataset")."""
    hub, datasets = hub_cache_dirs()
    folder = f"{kind}s--" + name.replace("/", "--")
    return (hub / folder).is_dir() or (kind == "dataset" and (datasets / name.replace("/", "___")).is_dir())


def check_model_spec(flag: str, spec: str, *, gguf_file: str | None = None) -> None:
    """Refuse a model argument that names nothing: a missing local path, a bare name absent from the cache, a
    GGUF file where a directory is wanted (or a directory holding only GGUF files without --gguf-file)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if gguf_file is not None:
            if not (path / gguf_file).is_file():
                found = sorted(p.name for p in path.glob("*.gguf"))
                raise ConfigError(f"--gguf-file {gguf_file}: no such file in {spec}"
                                  + (f" (it holds {', '.join(found)})" if found else ""))
            return
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            if ggufs:
                raise ConfigError(f"{flag} {spec}: holds a GGUF checkpoint ({', '.join(ggufs)}) and no config.json; "
                                  f"load it with --gguf-file {ggufs[0]}")
            raise ConfigError(f"{flag} {spec}: not a model directory (no config.json or adapter_config.json)")
        return
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            raise ConfigError(f"{flag} {spec}: a GGUF file; give its directory as {flag} and the file name as "
                              f"--gguf-file {path.name}")
        raise ConfigError(f"{flag} {spec}: a file, not a model directory")
    if gguf_file is not None or looks_like_path(spec):
        raise ConfigError(f"{flag} {spec}: no such directory")
    if not _HUB_ID.match(spec) and not in_hub_cache(spec, "model"):
        raise ConfigError(f"{flag} {spec}: no such directory, and not a Hub name of the form owner/name "
                          "(a bare name is looked up on the Hub only when the local cache holds it)")


def check_data_spec(flag: str, spec: str) -> None:
    """Refuse a data argument that names nothing (a missing local file, a bare name absent from the cache) or a
    file of a type dpokit does not read. What an existing file holds is checked when it is read."""
    path = Path(spec).expanduser()
    if path.is_file():
        problem = unsupported_file_type(path)
        if problem:
            raise ConfigError(f"{flag} {spec}: {problem}")
        return
    if path.exists():
        return
    if looks_like_path(spec):
        raise ConfigError(f"{flag} {spec}: no such file or directory")
    name = spec.partition(":")[0]
    if not _HUB_ID.match(name) and not in_hub_cache(name, "dataset"):
        raise ConfigError(f"{flag} {spec}: no such file or directory, and not a Hub data set of the form owner/name "
                          "(a bare name is looked up on the Hub only when the local cache holds it; local files "
                          "need an extension: .jsonl, .json, .parquet or .csv)")


def check_train_inputs(config) -> None:
    """Check every model and data argument of a TrainConfig (see the module docstring); nothing is loaded."""
    check_model_spec("--model", config.model, gguf_file=config.gguf_file)
    for flag, value in (("--ref-model", getattr(config, "ref_model", None)),
                        ("--ref-adapter", getattr(config, "ref_adapter", None))):
        if value is not None:
            check_model_spec(flag, value)
    check_data_spec("--data", config.data)
    if config.eval_data:
        check_data_spec("--eval-data", config.eval_data)


def check_eval_inputs(config) -> None:
    """Check the model, reference and data arguments of an EvalConfig, ScoreConfig or RankConfig; nothing is
    loaded."""
    check_model_spec("--model", config.model, gguf_file=getattr(config, "gguf_file", None))
    if config.ref_model is not None:
        check_model_spec("--ref-model", config.ref_model)
    check_data_spec("--data", config.data)
