"""The on-disk cache of tokenised data: a second run with the same inputs starts training without re-tokenising.

**Key.** A sha256 over everything that decides the token ids: the raw data (the bytes of a data file, every
file of a ``save_to_disk`` directory, or a Hub data set's fingerprint) of ``--data`` and ``--eval-data`` with
their specs and splits, the eval split settings, the stage, the format and column names, the tokenisation
settings, and the tokenizer (its whole serialised pipeline: vocabulary, merges, normaliser, pre-tokenizer,
post-processor and added tokens; its special tokens and chat template; the transformers and tokenizers
versions), plus dpokit's cache format and tokenisation-rules versions. Change any of them and the data is
tokenised again; a data set the key cannot be computed for (a Hub data set that does not load) is not cached.

**Entry.** ``<cache dir>/<key>/``: ``manifest.json`` (what went into the key, the lines the first run logged
with its load and filter counts, the shards with their sizes and sha256) and ``train-NNNNN.safetensors`` /
``eval-NNNNN.safetensors`` shards holding flat token arrays (uint16 when the vocabulary fits, else int32),
per-example lengths and the examples' sources. An entry is written in a temporary directory and renamed into
place, so a reader sees a complete entry or none; a shard whose size or checksum does not match makes the
entry a miss (re-tokenised and replaced). Only JSON and safetensors are read: nothing is unpickled.

The cache directory is ``$DPOKIT_CACHE`` if set, else ``~/.cache/dpokit/tokenized``. Entries are never evicted:
delete the directory (or an entry) to reclaim the space.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from tqdm.auto import tqdm

from dpokit.data.arrays import TokenArrays
from dpokit.data.tokenize import RULES_VERSION, FilterReport, TokenizedExample, examples_from_arrays

CACHE_FORMAT = 1
ENV = "DPOKIT_CACHE"
MANIFEST = "manifest.json"
SHARD_TOKENS = 1 << 24  # tokens per shard file (32 MiB as uint16)
_TMP = ".tmp-"


def default_cache_dir() -> Path:
    """``$DPOKIT_CACHE``, or ``~/.cache/dpokit/tokenized``."""
    env = os.environ.get(ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dpokit" / "tokenized"


# --- the key --------------------------------------------------------------------------------------------------

def _hash_file(digest, path: Path) -> None:
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)


def source_digest(spec: str | os.PathLike, split: str, streaming: bool = False) -> str | None:
    """A digest of the raw data that ``read_rows(spec, split)`` reads, or None if there is none to take (a Hub
    data set that does not load, a missing file: reading it will then report the error; a Hub data set read
    with `streaming`, whose fingerprint would need the download that streaming avoids)."""
    path = Path(os.fspath(spec)).expanduser()
    digest = hashlib.sha256()
    if path.is_file():
        _hash_file(digest, path)
        return "file:" + digest.hexdigest()
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(f"{file.relative_to(path).as_posix()}\0{file.stat().st_size}\0".encode())
            _hash_file(digest, file)
        return "dir:" + digest.hexdigest()
    if path.exists() or streaming:
        return None
    try:  # a Hub data set: datasets' own fingerprint of the loaded split (its files and revision)
        import datasets

        name, _, config = os.fspath(spec).partition(":")
        fingerprint = datasets.load_dataset(name, config or None, split=split)._fingerprint
    except Exception:
        return None
    return f"hub:{fingerprint}" if fingerprint else None


def tokenizer_digest(tokenizer) -> str | None:
    """A digest of everything about `tokenizer` that decides token ids; None for a tokenizer without a
    serialisable fast backend (not cached)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        return None
    import tokenizers
    import transformers

    digest = hashlib.sha256(backend.to_str().encode())
    extra = {
        "class": type(tokenizer).__name__,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special_ids": sorted(tokenizer.all_special_ids),
        "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
        "split_special_tokens": getattr(tokenizer, "split_special_tokens", None),
        "encode_special_tokens": getattr(backend, "encode_special_tokens", None),
        "versions": [transformers.__version__, tokenizers.__version__],
    }
    digest.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def cache_inputs(config, stage: str, tokenizer, settings, columns) -> tuple[dict[str, Any] | None, str]:
    """What goes into the key of `config`'s data for `stage`, or (None, why not) when it cannot be cached."""
    tok = tokenizer_digest(tokenizer)
    if tok is None:
        return None, "the tokenizer has no serialisable fast backend"
    streaming = getattr(config, "streaming", False)
    data = source_digest(config.data, config.split, streaming)
    if data is None:
        return None, f"no digest of {config.data}"
    if config.eval_data:
        eval_digest = source_digest(config.eval_data, config.eval_split, streaming)
        if eval_digest is None:
            return None, f"no digest of {config.eval_data}"
        evaluation = {"data": os.fspath(config.eval_data), "split": config.eval_split, "digest": eval_digest}
    elif config.eval_fraction:
        evaluation = {"fraction": config.eval_fraction, "seed": config.seed}
    else:
        evaluation = None
    return {
        "cache_format": CACHE_FORMAT, "rules": RULES_VERSION, "stage": stage,
        "data": {"spec": os.fspath(config.data), "split": config.split, "digest": data},
        "eval": evaluation, "format": config.format, "columns": dataclasses.asdict(columns),
        "tokenize": dataclasses.asdict(settings), "tokenizer": tok,
    }, ""


def cache_key(inputs: dict[str, Any]) -> str:
    """The entry name of `inputs`: a sha256 of their canonical JSON."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


# --- shards ---------------------------------------------------------------------------------------------------

def _shard_bytes(arrays: TokenArrays) -> bytes:
    from safetensors.numpy import save

    tokens = arrays.tokens
    dtype = np.uint16 if len(tokens) == 0 or int(tokens.max()) < 1 << 16 else np.int32
    sources = [s.encode() for s in arrays.sources]
    return save({
        "tokens": np.ascontiguousarray(tokens, dtype=dtype),
        "prompt_lengths": np.ascontiguousarray(arrays.prompt_lengths, dtype=np.int32),
        "response_counts": np.ascontiguousarray(arrays.response_counts, dtype=np.int32),
        "response_lengths": np.ascontiguousarray(arrays.response_lengths, dtype=np.int32),
        "source_bytes": np.frombuffer(b"".join(sources), dtype=np.uint8),
        "source_lengths": np.fromiter(map(len, sources), dtype=np.int32, count=len(sources)),
    }, metadata={"dpokit_cache_format": str(CACHE_FORMAT)})


def _shard_arrays(data: bytes) -> TokenArrays:
    from safetensors.numpy import load

    t = load(data)
    blob = t["source_bytes"].tobytes()
    ends = np.cumsum(t["source_lengths"], dtype=np.int64).tolist()
    sources = [blob[a:b].decode() for a, b in zip([0] + ends[:-1], ends)]
    return TokenArrays(t["tokens"].astype(np.int32), t["prompt_lengths"], t["response_counts"],
                       t["response_lengths"], sources)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _remove(path: Path) -> None:
    """Remove a directory (renamed aside first, so that a half-removed entry is never read)."""
    aside = path.with_name(f"{_TMP}removed-{uuid.uuid4().hex}")
    try:
        os.replace(path, aside)
    except OSError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def _clean_stale_temporaries(root: Path) -> None:
    """Remove temporary entry directories left by killed runs of this host (their process is gone)."""
    host = socket.gethostname()
    for tmp in root.glob(f"{_TMP}*"):
        parts = tmp.name[len(_TMP):].split("~")
        if parts[0].startswith("removed-"):
            shutil.rmtree(tmp, ignore_errors=True)
            continue
        if len(parts) != 4 or parts[1] != host or not parts[2].isdigit():
            continue
        try:
            os.kill(int(parts[2]), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


class CacheWriter:
    """Writes one entry: shards as the chunks come (bounded memory), then the manifest, then the rename.

    A cache that cannot be written (a full disk, a read-only directory) costs the run nothing but the cache:
    the writer stops, removes what it wrote, and says why in `error`; commit() then returns None."""

    def __init__(self, root: Path, key: str, shard_tokens: int = SHARD_TOKENS):
        self.root, self.key, self.shard_tokens = root, key, shard_tokens
        root.mkdir(parents=True, exist_ok=True)
        _clean_stale_temporaries(root)
        self.tmp = root / f"{_TMP}{key[:16]}~{socket.gethostname()}~{os.getpid()}~{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir()
        self.parts: dict[str, list[dict]] = {}
        self.pending: dict[str, list[TokenArrays]] = {}
        self.error: str | None = None

    def _failed(self, error: OSError) -> None:
        self.error = f"cannot write {self.root}: {error}"
        self.pending = {part: [] for part in self.pending}
        self.abort()

    def sink(self, part: str) -> Callable[[TokenArrays], None]:
        """A callable that takes `part`'s chunks (for tokenize_examples)."""
        self.parts.setdefault(part, [])
        self.pending.setdefault(part, [])

        def add(arrays: TokenArrays) -> None:
            if len(arrays) and self.error is None:
                self.pending[part].append(arrays)
                if sum(len(a.tokens) for a in self.pending[part]) >= self.shard_tokens:
                    try:
                        self._flush(part)
                    except OSError as error:
                        self._failed(error)

        return add

    def _flush(self, part: str) -> None:
        if not self.pending[part]:
            return
        arrays = TokenArrays.concat(self.pending[part])
        self.pending[part] = []
        name = f"{part}-{len(self.parts[part]):05d}.safetensors"
        data = _shard_bytes(arrays)
        _write_synced(self.tmp / name, data)
        self.parts[part].append({"file": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                                 "examples": len(arrays), "tokens": int(len(arrays.tokens))})

    def finish(self, inputs: dict | None, log: list[str], reports: dict[str, FilterReport]) -> None:
        """Write the last shards and the manifest into the temporary directory (raises OSError)."""
        manifest = {
            "cache_format": CACHE_FORMAT, "key": self.key, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "inputs": inputs, "log": log, "parts": {},
        }
        for part in self.parts:
            self._flush(part)
        manifest["parts"] = {part: {"shards": shards, "report": dataclasses.asdict(reports[part])}
                             for part, shards in self.parts.items()}
        # written aside and renamed: a process waiting for the manifest (dpokit.data.streaming) never reads half of it
        _write_synced(self.tmp / f"{MANIFEST}.part", json.dumps(manifest, indent=1).encode())
        os.replace(self.tmp / f"{MANIFEST}.part", self.tmp / MANIFEST)

    def commit(self, inputs: dict, log: list[str], reports: dict[str, FilterReport]) -> Path | None:
        """Finish the entry and move it into place; returns its path, or None if it could not be written
        (see `error`). If another process finished the same entry first, keeps that one."""
        if self.error is not None:
            return None
        final = self.root / self.key
        try:
            self.finish(inputs, log, reports)
            try:
                os.replace(self.tmp, final)
            except OSError:
                if not (final / MANIFEST).exists():
                    raise
                self.abort()  # a complete entry is already there (another process of this run, say)
        except OSError as error:
            self._failed(error)
            return None
        return final

    def abort(self) -> None:
        """Discard what was written."""
        shutil.rmtree(self.tmp, ignore_errors=True)


# --- reading --------------------------------------------------------------------------------------------------

@dataclass
class CachedData:
    """A cache entry read back: the logged lines, and per part its examples and filter report."""

    path: Path
    log: list[str]
    examples: dict[str, list[TokenizedExample]]
    reports: dict[str, FilterReport]


class DamagedEntry(Exception):
    """A cache entry that cannot be used as it is."""


def read_entry(path: Path) -> CachedData:
    """Read the entry at `path`; raises DamagedEntry if anything in it does not check out."""
    bar = None
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        if manifest.get("cache_format") != CACHE_FORMAT:
            raise DamagedEntry(f"cache format {manifest.get('cache_format')}, expected {CACHE_FORMAT}")
        examples, reports = {}, {}
        total = sum(shard["examples"] for info in manifest["parts"].values() for shard in info["shards"])
        bar = tqdm(total=total, desc="reading tokenised data", unit="ex", delay=1.0)
        for part, info in manifest["parts"].items():
            examples[part] = []
            for shard in info["shards"]:
                data = (path / shard["file"]).read_bytes()
                if len(data) != shard["bytes"] or hashlib.sha256(data).hexdigest() != shard["sha256"]:
                    raise DamagedEntry(f"{shard['file']} does not match its checksum")
                arrays = _shard_arrays(data)
                del data
                if len(arrays) != shard["examples"]:
                    raise DamagedEntry(f"{shard['file']} holds {len(arrays)} examples, expected {shard['examples']}")
                examples[part].extend(examples_from_arrays(arrays))
                bar.update(len(arrays))
            reports[part] = FilterReport(**info["report"])
            if len(examples[part]) != reports[part].kept:
                raise DamagedEntry(f"{part}: {len(examples[part])} examples, expected {reports[part].kept}")
        return CachedData(path, list(manifest["log"]), examples, reports)
    except DamagedEntry:
        raise
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as error:  # missing files, bad JSON...
        raise DamagedEntry(f"{type(error).__name__}: {error}") from None
    finally:
        if bar is not None:
            bar.close()


@dataclass
class DataCache:
    """Where the entry of one set of inputs lives, and reading and writing it."""

    root: Path
    inputs: dict[str, Any]

    @property
    def key(self) -> str:
        return cache_key(self.inputs)

    @property
    def path(self) -> Path:
        return self.root / self.key

    def load(self, log: Callable[[str], None]) -> CachedData | None:
        """The entry, or None when there is none (a damaged one is reported and removed)."""
        if not (self.path / MANIFEST).is_file():
            return None
        try:
            return read_entry(self.path)
        except DamagedEntry as error:
            log(f"tokenised data: cache entry {self.path} is damaged ({error}); tokenising again")
            _remove(self.path)
            return None

    def writer(self, log: Callable[[str], None]) -> CacheWriter | None:
        """A writer for the entry, or None (logged) if the cache directory cannot be written."""
        try:
            return CacheWriter(self.root, self.key)
        except OSError as error:
            log(f"tokenised data: not cached (cannot write {self.root}: {error})")
            return None


def open_cache(config, stage: str, tokenizer, settings, columns, *, cache_dir: str | os.PathLike | None = None,
               log: Callable[[str], None] = print) -> DataCache | None:
    """The cache for `config`'s data, or None (logged) when its key cannot be computed."""
    inputs, why = cache_inputs(config, stage, tokenizer, settings, columns)
    if inputs is None:
        log(f"tokenised data: not cached ({why})")
        return None
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return DataCache(root, inputs)
