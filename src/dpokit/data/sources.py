"""Read raw rows from local files, saved datasets or the Hugging Face Hub, each with its provenance.

Provenance strings (used in every later error message):

* ``.jsonl`` and ``.csv``: ``"path:LINE"``, the 1-based physical line where the record starts
  (for CSV the header is line 1, so the first data row is usually line 2); for a compressed file
  (``.jsonl.gz``, ``.csv.zst``, ...) the line of the decompressed text;
* ``.json`` holding a list, ``.parquet``, ``save_to_disk`` directories: ``"path row N"``, N 0-based,
  i.e. the index you would use in ``dataset[N]``; a split of a DatasetDict is ``"path[split] row N"``;
* Hub datasets: ``"name[split] row N"`` (or ``"name:config[split] row N"``), N 0-based.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dpokit.errors import ConfigError, DataError
from dpokit.data.validation import check_data_spec, data_format, looks_like_path, unsupported_file_type

# Keys under which a top-level JSON object may hold its rows (the split name is tried first).
_JSON_LIST_KEYS = ("data", "rows", "examples")

Row = dict[str, Any]


def read_rows(spec: str | os.PathLike, split: str = "train", *, streaming: bool = False) -> Iterator[tuple[Row, str]]:
    """Yield ``(row, provenance)`` for every row of the data set named by ``spec``.

    ``spec`` is a ``.jsonl``/``.json``/``.parquet``/``.csv`` file, a directory written by
    ``Dataset.save_to_disk``/``DatasetDict.save_to_disk``, or, if no such path exists, a Hub data set
    ``"name"`` or ``"name:config"``. ``split`` selects the split of a DatasetDict or Hub data set (it is
    also tried as the key of a ``.json`` object); it is ignored for single-split files.

    Rows are read as they are consumed, without holding the data set: ``.jsonl`` and ``.csv`` line by line,
    ``.parquet`` one row group at a time, ``save_to_disk`` directories memory-mapped (Arrow); a ``.json``
    list is parsed whole. A Hub data set is downloaded and prepared in the Hugging Face cache first, unless
    `streaming` is set: then its rows are fetched as they are read (``load_dataset(..., streaming=True)``).

    The spec is resolved eagerly, so a missing file or an unknown extension raises
    :class:`DataError` at call time; errors inside the file are raised while iterating.
    """
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        return _read_saved(path, text, split)
    if path.exists():
        problem = unsupported_file_type(path)
        if problem:
            raise DataError(f"{text}: {problem}")
        suffix, compression = data_format(path)
        if suffix == ".parquet":
            return _read_parquet(path, text)
        reader = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv}[suffix]
        return _decompressed(reader(path, text, split, compression), text)
    if looks_like_path(text):
        # Never fall back to the Hub for something that is clearly meant as a local file: a typo in a
        # file name should not turn into a confusing network error.
        raise DataError(f"{text}: file not found")
    try:  # a bare name (no owner/) goes to the Hub only when the local cache holds it (see dpokit.data.validation)
        check_data_spec("data", text)
    except ConfigError as error:
        raise DataError(str(error).removeprefix("data ")) from None
    return _read_hub(text, split, streaming)


def open_binary(path: Path, compression: str | None):
    """`path` opened for reading bytes, decompressed on the fly when `compression` (see
    dpokit.data.validation.COMPRESSIONS) is set: the standard library's codecs, and zstandard's for zstd."""
    if compression is None:
        return open(path, "rb")
    if compression == "zstd":
        try:
            import zstandard
        except ImportError:
            raise DataError(f"{path}: reading zstd-compressed files needs the zstandard package: "
                            "pip install zstandard") from None
        return io.BufferedReader(zstandard.open(path, "rb"))  # its reader reads, but has no lines
    import bz2
    import gzip
    import lzma

    return {"gzip": gzip.open, "bz2": bz2.open, "xz": lzma.open}[compression](path, "rb")


def _decompressed(rows: Iterator[tuple[Row, str]], label: str) -> Iterator[tuple[Row, str]]:
    """`rows`, with a damaged compressed stream reported as a one-line DataError naming the file."""
    import zlib

    try:
        yield from rows
    except (OSError, EOFError, zlib.error) as error:  # each codec's word for a truncated or damaged stream
        raise DataError(f"{label}: cannot decompress ({error or type(error).__name__}); the file is damaged or "
                        "incomplete") from None


def _read_jsonl(path: Path, label: str, split: str = "train", compression: str | None = None
                ) -> Iterator[tuple[Row, str]]:
    # Read bytes and decode per line so that a bad byte is reported with its line number.
    with open_binary(path, compression) as f:
        for lineno, raw in enumerate(f, start=1):
            prov = f"{label}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{prov}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if lineno == 1:
                line = line.lstrip("\ufeff")
            if line.isspace() or not line:  # a blank line (as `not line.strip()`, without copying the line)
                continue
            yield _parse_json_object(line, prov), prov


def _parse_json_object(line: str, prov: str) -> Row:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{prov}: invalid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{prov}: expected a JSON object, got {_json_type(obj)}")
    return obj


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _read_json(path: Path, label: str, split: str, compression: str | None = None) -> Iterator[tuple[Row, str]]:
    try:
        with open_binary(path, compression) as f:
            text = f.read().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{label}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":
            # Many published ".json" files are really JSON Lines; read them as such (with line numbers).
            yield from _read_jsonl(path, label, split, compression)
            return
        raise DataError(f"{label}: invalid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    if isinstance(data, dict):
        key = next((k for k in (split, *_JSON_LIST_KEYS) if isinstance(data.get(k), list)), None)
        if key is None:
            raise DataError(
                f"{label}: expected a list of objects, or an object with a list under "
                f"{', '.join(repr(k) for k in (split, *_JSON_LIST_KEYS))}; found keys {sorted(data)}"
            )
        data = data[key]
    elif not isinstance(data, list):
        raise DataError(f"{label}: expected a list of objects, got {_json_type(data)}")
    for i, obj in enumerate(data):
        prov = f"{label} row {i}"
        if not isinstance(obj, dict):
            raise DataError(f"{prov}: expected a JSON object, got {_json_type(obj)}")
        yield obj, prov


def _read_parquet(path: Path, label: str) -> Iterator[tuple[Row, str]]:
    # pyarrow directly (a datasets dependency): streams by batch and writes nothing to the HF cache.
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{label}: cannot read parquet file: {e}") from None
    i = 0
    for batch in pf.iter_batches():
        for row in batch.to_pylist():
            yield row, f"{label} row {i}"
            i += 1


def _read_csv(path: Path, label: str, split: str = "train", compression: str | None = None
              ) -> Iterator[tuple[Row, str]]:
    # The stdlib reader keeps every cell a string (no "42" -> int or "" -> NaN surprises) and
    # gives exact line numbers even for quoted multi-line cells.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with io.TextIOWrapper(open_binary(path, compression), newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                return
            last_line = reader.line_num
            for cells in reader:
                prov = f"{label}:{last_line + 1}"
                last_line = reader.line_num
                if not cells:
                    continue
                if len(cells) != len(header):
                    raise DataError(f"{prov}: expected {len(header)} fields (as in the header), got {len(cells)}")
                yield dict(zip(header, cells)), prov
        except csv.Error as e:
            raise DataError(f"{label}:{reader.line_num}: invalid CSV: {e}") from None
        except UnicodeDecodeError as e:
            raise DataError(f"{label}: not valid UTF-8 ({e.reason})") from None


def _read_saved(path: Path, label: str, split: str) -> Iterator[tuple[Row, str]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise DataError(
            f"{label}: directory is not a data set written by Dataset.save_to_disk or DatasetDict.save_to_disk"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{label}: no split {split!r}; available splits: {', '.join(ds)}")
        ds, label = ds[split], f"{label}[{split}]"
    return _iter_dataset(ds, label)


def _read_hub(spec: str, split: str, streaming: bool = False) -> Iterator[tuple[Row, str]]:
    import datasets

    name, _, config = spec.partition(":")
    try:
        options = {"streaming": True} if streaming else {}
        ds = datasets.load_dataset(name, config or None, split=split, **options)
    except Exception as e:  # network, auth, unknown name/config/split: all reported the same way
        raise DataError(f"{spec}: not a local file or directory, and loading it from the Hub failed: {e}") from None
    return _iter_dataset(ds, f"{spec}[{split}]")


def _iter_dataset(ds: Any, label: str) -> Iterator[tuple[Row, str]]:
    for i, row in enumerate(ds):
        yield row, f"{label} row {i}"
