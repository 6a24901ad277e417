"""``--streaming``: data larger than memory, with the same examples, order and resume as the in-memory path.

Rows are read and validated one at a time (local ``.jsonl``/``.csv`` line by line, ``.parquet`` by row group,
``save_to_disk`` directories memory-mapped, Hub data sets with ``load_dataset(..., streaming=True)``), gathered
into chunks of :data:`CHUNK` records, tokenised chunk by chunk and written straight into the shards of a
data-cache entry (dpokit.data.cache); neither the records nor the tokenised examples are kept. Training then
reads the examples from the memory-mapped shards through :class:`dpokit.data.sharded.ShardedExamples`. So memory is
bounded by one chunk of records plus a few index arrays (about 40 bytes per example), not by the data.

Same as the in-memory path, exactly: the chunks are the same (1000 consecutive records of a part), so the token
ids, filter counts, logged lines and cache entry are the same; the trainer draws its seeded permutation of
example indices per epoch as always, so the data order is the same and a resume finds its data position from the
step number. ``--eval-fraction`` holds out the same records as in memory (a seeded sample of round(n · fraction)
of the n records, see ``split_eval``): that needs n first, so the data is read twice, once to count the records
and once to tokenise them (``--eval-data`` reads once).

Where the shards go: the cache entry of the data's key, reused by later runs, streamed or not; without a key
(``--no-data-cache``, or a streamed Hub data set, which has no fingerprint before it is downloaded) a temporary
entry in the cache directory that is removed when the run ends. Either way the disk needs about 2 bytes per
token (4 for vocabularies over 65536).

Several processes (``accelerate launch``, ``torchrun``): the first process of each node writes the entry, the
others read its shards once it is complete, so every process trains on the same examples in the same global
order (the trainer's seeded permutation, split by rank as in memory). The others wait on the file system, not
in a collective: tokenising a large data set takes longer than a collective's timeout.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from dpokit.data.checks import glued_boundary_message, glued_response
from dpokit.data.formats import ColumnMap, eval_indices, stream_completions, stream_preferences
from dpokit.data.cache import MANIFEST, CacheWriter, DamagedEntry, _remove, default_cache_dir, open_cache
from dpokit.errors import DataError
from dpokit.data.sharded import ShardedExamples, TemporaryEntry, open_entry
from dpokit.data.tokenize import (ChunkTokenizer, FilterReport, TokenizeConfig, check_report, plain_text_message,
                             release_freed_memory)

CHUNK = 1000  # records per batched tokenizer call: the most records held at once (per part)


def prepare_streamed(config, stage: str, tokenizer, settings: TokenizeConfig, columns: ColumnMap,
                     log: Callable[[str], None], *, cache_dir: str | os.PathLike | None = None,
                     use_cache: bool = True) -> tuple[ShardedExamples, ShardedExamples | list]:
    """The training and evaluation examples of `config` for `stage`, streamed into shards and read lazily
    (see the module docstring); logs the same lines as the in-memory path (dpokit.api.prepare_data).

    Under a multi-process launch only the first process of each node reads the data and writes the entry; the
    others read that entry's shards (see :class:`_NodeShare`)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache = open_cache(config, stage, tokenizer, settings, columns, cache_dir=root, log=log) if use_cache else None
    share = _node_share()
    if share is not None and not share.writes:
        return _read_shared(share.exchange(None))
    try:
        parts = _reuse(cache, log)
        writer = None if parts is not None else _writer(root, cache)
    except BaseException:
        if share is not None:
            share.exchange(None)  # tells the others to stop too
        raise
    if share is not None:  # where the entry will be, and the directory it is written in until then
        share.exchange((cache.path if cache is not None else writer.tmp, None if writer is None else writer.tmp))
    if parts is not None:
        return parts["train"], parts.get("eval", [])
    try:
        lines, reports = _tokenize_into(writer, config, stage, tokenizer, settings, columns, log)
        if cache is not None:
            entry = writer.commit(cache.inputs, lines, reports)
            if entry is None:
                raise DataError(f"--streaming: {writer.error}")
            log(f"tokenised data: cached in {entry}")
            parts, _ = open_entry(entry, verify=False)
        else:
            writer.finish(None, lines, reports)
            parts, _ = open_entry(writer.tmp, verify=False, owner=TemporaryEntry(writer.tmp))
            log(f"tokenised data: in {writer.tmp} (not cached: removed when this run ends)")
    except BaseException:
        writer.abort()
        raise
    release_freed_memory()  # the tokenizer's freed buffers, back to the OS
    return parts["train"], parts.get("eval", [])


def _writer(root: Path, cache) -> CacheWriter:
    """A writer for `cache`'s entry, or for a temporary one when `cache` is None."""
    try:
        return CacheWriter(root, cache.key if cache is not None else "temporary")
    except OSError as error:
        raise DataError(f"--streaming writes the tokenised data to disk, and {root} cannot be written: {error} "
                        "(set --data-cache-dir or $DPOKIT_CACHE)") from None


def _read_shared(where: tuple[str, str | None] | None) -> tuple[ShardedExamples, ShardedExamples | list]:
    """The parts of the entry that this node's first process writes (`where`: see _NodeShare.exchange), once
    it is complete; raises DataError if the writer failed."""
    failed = DataError("--streaming: the first process of this node failed to prepare the data (see its error)")
    if where is None:
        raise failed
    entry, tmp = Path(where[0]), where[1] and Path(where[1])
    delay = 0.05
    # the writer's manifest appears whole (renamed into place, with the entry when it is cached); its
    # directory disappears without an entry if it gave up (CacheWriter.abort)
    while not (entry / MANIFEST).is_file():
        if tmp is not None and not tmp.exists() and not (entry / MANIFEST).is_file():
            raise failed
        time.sleep(delay)
        delay = min(2 * delay, 1.0)
    parts, _ = open_entry(entry, verify=False)  # checked (or just written) by the writer
    return parts["train"], parts.get("eval", [])


def _reuse(cache, log: Callable[[str], None]) -> dict[str, ShardedExamples] | None:
    """The parts of `cache`'s entry if it is there and checks out (logging its lines), else None (a damaged
    entry is reported and removed)."""
    if cache is None or not (cache.path / MANIFEST).is_file():
        return None
    try:
        parts, lines = open_entry(cache.path, verify=True)
    except DamagedEntry as error:
        log(f"tokenised data: cache entry {cache.path} is damaged ({error}); tokenising again")
        _remove(cache.path)
        return None
    for line in lines:
        log(line)
    log(f"tokenised data: reusing {cache.path}")
    return parts


@dataclass
class _NodeShare:
    """One entry per node under a multi-process launch: the node's first process (LOCAL_RANK 0) writes it.

    The processes agree on its path with one quick collective before the writing starts; the others then wait
    for its manifest on the file system instead of in a collective, whose timeout (30 min for gloo, 10 for
    NCCL) tokenising a large data set would exceed. If the writer fails, the launcher stops the others."""

    writes: bool
    writer_rank: int  # the global rank of this node's first process (torchrun numbers a node's ranks in a row)

    def exchange(self, where: tuple | None) -> tuple[str, str | None] | None:
        """Every process calls this once: the writer with (entry path, temporary directory or None), or None if
        it failed; the others with None. Returns what this node's writer gave."""
        import torch.distributed as dist

        given: list = [None] * dist.get_world_size()
        dist.all_gather_object(given, None if where is None else tuple(p and str(p) for p in where))
        return given[self.writer_rank]


def _node_share() -> _NodeShare | None:
    """The share of an initialised multi-process launch (dpokit.api makes the accelerator first), else None:
    a process alone writes its own entry."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return None
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    return _NodeShare(writes=local == 0, writer_rank=dist.get_rank() - local)


def _tokenize_into(writer: CacheWriter, config, stage: str, tokenizer, settings: TokenizeConfig,
                   columns: ColumnMap, log: Callable[[str], None]) -> tuple[list[str], dict[str, FilterReport]]:
    """Read, split and tokenise the data into `writer`'s shards; returns the lines the in-memory path logs and
    the filter reports of the parts."""
    stream = stream_preferences if stage == "dpo" else stream_completions

    def read(spec, split):
        return stream(spec, format=config.format, columns=columns, split=split, streaming=True)

    tokenize = ChunkTokenizer(tokenizer, settings)
    reports = {"train": FilterReport()}
    tally = _Tally()
    eval_line = None
    if config.eval_data:
        records, report = read(config.data, config.split)
        eval_records, _ = read(config.eval_data, config.eval_split)  # a missing file fails now, not after tokenising
        n = _feed(records, lambda i: "train", tokenize, writer, reports, tally)
        reports["eval"] = FilterReport()
        n_eval = _feed(eval_records, lambda i: "eval", tokenize, writer, reports, tally)
        eval_line = f"eval data: {n_eval} examples from {config.eval_data}"
    elif config.eval_fraction:
        records, _ = read(config.data, config.split)
        n = sum(1 for _ in records)  # the first of two reads: the held-out sample needs the number of records
        held_out = eval_indices(n, config.eval_fraction, config.seed)
        reports["eval"] = FilterReport()
        records, report = read(config.data, config.split)
        counted = _feed(records, lambda i: "eval" if i in held_out else "train", tokenize, writer, reports, tally)
        if counted != n:
            raise DataError(f"{config.data}: changed while it was read ({n} records, then {counted})")
        eval_line = f"eval data: {len(held_out)} examples held out of {config.data} (seed {config.seed})"
    else:
        records, report = read(config.data, config.split)
        n = _feed(records, lambda i: "train", tokenize, writer, reports, tally)
    lines = [f"data: {n} examples from {config.data} ({report.format} format, {report.rows} rows"
             + "".join(f"; {k} {reason}" for reason, k in report.counts.items()) + ")"]
    if eval_line:
        lines.append(eval_line)
    lines += tally.warnings(tokenizer, settings)
    for part, what in (("train", "training"), ("eval", "eval")):
        if part in reports:
            check_report(reports[part], settings)
            lines.append(f"tokenised {what} data: {reports[part].summary()}")
    for line in lines:
        log(line)
    return lines, reports


class _Tally:
    """What the in-memory path's data warnings count over all records (plain-text prompts, prompts glued to their
    responses), kept as counts and one example instead of the records."""

    def __init__(self) -> None:
        self.records = self.plain = self.glued = 0
        self.first_glued: dict[str, object] = {}  # per part: the in-memory path lists train before eval records

    def add(self, record, part: str) -> None:
        """Count `record`, of `part`."""
        self.records += 1
        self.plain += isinstance(record.prompt, str)
        if glued_response(record) is not None:
            self.glued += 1
            self.first_glued.setdefault(part, record)

    def warnings(self, tokenizer, settings: TokenizeConfig) -> list[str]:
        """The warning lines, as dpokit.api.prepare_data words them."""
        lines = [plain_text_message(self.plain, self.records, tokenizer, settings)]
        if not settings.apply_chat_template:
            first = self.first_glued.get("train") or self.first_glued.get("eval")
            lines.append(glued_boundary_message(self.glued, self.records, first))
        return [line for line in lines if line]


def _feed(records: Iterable, part_of: Callable[[int], str], tokenize: ChunkTokenizer, writer: CacheWriter,
          reports: dict[str, FilterReport], tally: _Tally) -> int:
    """Tokenise `records` into the writer's parts (`part_of` the record's position), CHUNK consecutive records
    of a part at a time, as the in-memory path chunks each part; returns the number of records."""
    pending: dict[str, list] = {part: [] for part in reports}
    sinks = {part: writer.sink(part) for part in reports}

    def flush(part: str) -> None:
        arrays = tokenize(pending[part], reports[part])
        pending[part] = []
        reports[part].kept += len(arrays)
        sinks[part](arrays)
        if writer.error is not None:  # a streamed run has nowhere else to keep its data
            raise DataError(f"--streaming: {writer.error}")

    n = 0
    for n, record in enumerate(records, start=1):
        part = part_of(n - 1)
        tally.add(record, part)
        pending[part].append(record)
        if len(pending[part]) == CHUNK:
            flush(part)
    for part in pending:
        if pending[part]:
            flush(part)
    return n
