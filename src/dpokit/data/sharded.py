"""Tokenised examples read lazily from a data-cache entry's shards, and a digest of any sequence of examples.

:class:`ShardedExamples` is the ``Sequence[TokenizedExample]`` that ``--streaming`` trains on: it keeps the
shard files open (``safetensors.safe_open``, memory-mapped) and builds an example only when it is indexed, from
the slice of the flat token array that holds it. What it keeps in memory is a few index arrays (about 40 bytes
per example: lengths and offsets), never the token ids, so training on 200k or 20M pairs costs the same memory;
the operating system pages the shards in and out as the batches read them.

:func:`examples_digest` gives the same digest for a list of examples and for a ShardedExamples holding the same
examples, and reads the latter from its flat arrays without building a single example: run identities and the
reference-cache key use it (dpokit.train.checkpoint, dpokit.train.reference).
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import operator
import shutil
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from dpokit.data.cache import CACHE_FORMAT, MANIFEST, DamagedEntry
from dpokit.data.arrays import TokenArrays
from dpokit.data.tokenize import TokenizedExample, examples_from_arrays

_BLOCK = 1 << 20  # tokens read at a time when digesting a shard


def _starts(lengths: np.ndarray) -> np.ndarray:
    """Offsets [0, l0, l0+l1, ...] (one more than `lengths`), int64."""
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


class _Shard:
    """One shard file: its token array left on disk, its lengths in memory."""

    def __init__(self, path: Path):
        self.handle = safe_open(str(path), framework="numpy")
        self.tokens = self.handle.get_slice("tokens")
        self.prompt_lengths = self.handle.get_tensor("prompt_lengths").astype(np.int32)
        self.response_counts = self.handle.get_tensor("response_counts").astype(np.int32)
        self.response_lengths = self.handle.get_tensor("response_lengths").astype(np.int32)
        self.response_starts = _starts(self.response_counts)
        if self.response_starts[-1] != len(self.response_lengths):
            raise DamagedEntry(f"{path.name}: response counts and lengths disagree")
        lengths = self.prompt_lengths.astype(np.int64) + np.add.reduceat(
            self.response_lengths.astype(np.int64), self.response_starts[:-1]) if len(self) else np.zeros(0, np.int64)
        self.token_starts = _starts(lengths)
        if self.token_starts[-1] != self.tokens.get_shape()[0]:
            raise DamagedEntry(f"{path.name}: {self.tokens.get_shape()[0]} tokens, "
                               f"the lengths say {self.token_starts[-1]}")
        self.source_starts = _starts(self.handle.get_tensor("source_lengths").astype(np.int64))
        self.sources = self.handle.get_slice("source_bytes") if self.source_starts[-1] else None

    def __len__(self) -> int:
        return len(self.prompt_lengths)

    def arrays(self, lo: int, hi: int, sources: bool = True) -> TokenArrays:
        """Examples lo..hi-1 as TokenArrays (tokens as stored: uint16 or int32)."""
        r_lo, r_hi = self.response_starts[lo], self.response_starts[hi]
        names = []
        if sources and self.sources is not None:
            blob = self.sources[int(self.source_starts[lo]) : int(self.source_starts[hi])].tobytes()
            offsets = (self.source_starts[lo : hi + 1] - self.source_starts[lo]).tolist()
            names = [blob[a:b].decode() for a, b in zip(offsets[:-1], offsets[1:])]
        elif sources:
            names = [""] * (hi - lo)
        return TokenArrays(self.tokens[int(self.token_starts[lo]) : int(self.token_starts[hi])],
                           self.prompt_lengths[lo:hi], self.response_counts[lo:hi],
                           self.response_lengths[r_lo:r_hi], names)


class ShardedExamples(Sequence[TokenizedExample]):
    """The examples of one part (train or eval) of a cache entry, built on indexing (see the module docstring).

    Indexing with an int gives a TokenizedExample equal to the one the in-memory path holds; with a slice, a
    list of them. `owner` is kept alive as long as the sequence (a temporary entry removes its files when the
    last sequence reading them is gone)."""

    def __init__(self, files: Sequence[Path], owner: object = None):
        self._shards = [_Shard(Path(f)) for f in files]
        self._starts = _starts(np.array([len(s) for s in self._shards], dtype=np.int64)).tolist()
        self._owner = owner

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = operator.index(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} of {len(self)}")
        k = bisect.bisect_right(self._starts, index) - 1
        j = index - self._starts[k]
        return examples_from_arrays(self._shards[k].arrays(j, j + 1))[0]

    def __repr__(self) -> str:
        return f"ShardedExamples({len(self)} examples in {len(self._shards)} shards)"

    def blocks(self) -> Iterator[TokenArrays]:
        """The examples as TokenArrays of about a million tokens each, in order, without sources."""
        for shard in self._shards:
            lo = 0
            while lo < len(shard):
                hi = max(lo + 1, int(np.searchsorted(shard.token_starts, shard.token_starts[lo] + _BLOCK, "right")) - 1)
                hi = min(hi, len(shard))
                yield shard.arrays(lo, hi, sources=False)
                lo = hi


def _arrays_of(examples: Sequence[TokenizedExample]) -> TokenArrays:
    """TokenArrays holding `examples` (the inverse of examples_from_arrays), without sources."""
    lengths = [len(e.prompt_ids) + sum(map(len, e.responses)) for e in examples]
    flat = itertools.chain.from_iterable(itertools.chain((e.prompt_ids,), e.responses) for e in examples)
    tokens = np.fromiter(itertools.chain.from_iterable(flat), dtype=np.int64, count=sum(lengths))
    return TokenArrays(tokens, np.array([len(e.prompt_ids) for e in examples], dtype=np.int32),
                       np.array([len(e.responses) for e in examples], dtype=np.int32),
                       np.array([len(r) for e in examples for r in e.responses], dtype=np.int32), [])


def examples_digest(examples: Sequence[TokenizedExample]) -> str:
    """A sha256 of every example's token ids and segment lengths, in order (sources left out): the same for
    a list and for :class:`ShardedExamples` holding equal examples, and cheap for the latter."""
    if isinstance(examples, ShardedExamples):
        blocks: Iterator[TokenArrays] = examples.blocks()
    else:
        blocks = (_arrays_of(examples[lo : lo + 1000]) for lo in range(0, len(examples), 1000))
    hashes = [hashlib.sha256() for _ in range(4)]  # one per array, so the blocks' boundaries do not matter
    for arrays in blocks:
        for digest, values in zip(hashes, (arrays.tokens, arrays.prompt_lengths, arrays.response_counts,
                                           arrays.response_lengths)):
            digest.update(np.ascontiguousarray(values, dtype="<i4").data)
    return hashlib.sha256(b"".join(h.digest() for h in hashes)).hexdigest()


class TemporaryEntry:
    """An entry written for one run only (no cache key, or --no-data-cache): its directory is removed when the
    last sequence reading it is gone, or at exit. A killed run's is removed by the next writer (see
    dpokit.data.cache: its name holds the host and pid)."""

    def __init__(self, path: Path):
        self.path = path
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(path), True)


def _verify(path: Path, shard: dict) -> None:
    size = path.stat().st_size
    if size != shard["bytes"]:
        raise DamagedEntry(f"{shard['file']} holds {size} bytes, expected {shard['bytes']}")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    if digest.hexdigest() != shard["sha256"]:
        raise DamagedEntry(f"{shard['file']} does not match its checksum")


def open_entry(path: Path, *, verify: bool = True,
               owner: object = None) -> tuple[dict[str, ShardedExamples], list[str]]:
    """The parts of the cache entry at `path` as ShardedExamples, and the lines its first run logged.

    `verify` checks every shard's size and sha256 (read in blocks, not held); an entry just written by this
    process skips it. Raises DamagedEntry if anything does not check out."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        if manifest.get("cache_format") != CACHE_FORMAT:
            raise DamagedEntry(f"cache format {manifest.get('cache_format')}, expected {CACHE_FORMAT}")
        parts = {}
        for part, info in manifest["parts"].items():
            if verify:
                for shard in info["shards"]:
                    _verify(path / shard["file"], shard)
            parts[part] = ShardedExamples([path / shard["file"] for shard in info["shards"]], owner)
            expected = info["report"]["kept"]
            if len(parts[part]) != expected or len(parts[part]) != sum(s["examples"] for s in info["shards"]):
                raise DamagedEntry(f"{part}: {len(parts[part])} examples, expected {expected}")
        return parts, list(manifest["log"])
    except DamagedEntry:
        raise
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as error:  # missing files, bad JSON...
        raise DamagedEntry(f"{type(error).__name__}: {error}") from None
