"""Compressed data files (`.jsonl.gz`, `.json.bz2`, `.csv.xz`, `.jsonl.zst`, ...) read as their uncompressed
selves, with errors naming the line of the decompressed text; a damaged stream is a one-line DataError."""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import lzma
import random

import pytest
import zstandard

from dpokit.data.formats import load_preferences
from dpokit.data.sources import read_rows
from dpokit.data.validation import check_data_spec
from dpokit.errors import ConfigError, DataError

ROWS = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(5)]
COMPRESS = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress,
            ".zst": lambda data: zstandard.ZstdCompressor().compress(data)}


def _text(kind: str, rows: list[dict]) -> str:
    if kind == ".jsonl":
        return "".join(json.dumps(row) + "\n" for row in rows)
    if kind == ".json":
        return json.dumps(rows)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


@pytest.mark.parametrize("compression", list(COMPRESS))
@pytest.mark.parametrize("kind", [".jsonl", ".json", ".csv"])
def test_compressed_files_read_as_the_plain_ones(tmp_path, kind, compression):
    plain = tmp_path / f"pairs{kind}"
    plain.write_text(_text(kind, ROWS))
    packed = tmp_path / f"pairs{kind}{compression}"
    packed.write_bytes(COMPRESS[compression](plain.read_bytes()))
    check_data_spec("--data", str(packed))
    expected = [(row, prov.replace(str(plain), str(packed))) for row, prov in read_rows(plain)]
    assert list(read_rows(packed)) == expected
    pairs, _ = load_preferences(packed)
    assert [pair.chosen for pair in pairs] == [row["chosen"] for row in ROWS]


def test_an_error_names_the_line_of_the_decompressed_text(tmp_path):
    lines = _text(".jsonl", ROWS[:2]) + "\n" + '{"prompt": "q", "chosen": 5, "rejected": "b"}\n'
    path = tmp_path / "bad.jsonl.gz"
    path.write_bytes(gzip.compress(lines.encode()))
    with pytest.raises(DataError, match=r"bad\.jsonl\.gz:4: field 'chosen' must be a string"):
        load_preferences(path)


def test_a_damaged_stream_is_a_one_line_error(tmp_path):
    path = tmp_path / "cut.jsonl.gz"
    rows = [{"prompt": str(random.Random(i).random()), "chosen": "a", "rejected": "b"} for i in range(200)]
    whole = gzip.compress(_text(".jsonl", rows).encode())
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz: cannot decompress"):
        list(read_rows(path))


@pytest.mark.parametrize("name", ["pairs.parquet.gz", "pairs.txt.gz", "pairs.gz"])
def test_what_cannot_be_read_is_refused_up_front(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(gzip.compress(b"x"))
    with pytest.raises(ConfigError, match="unsupported file type"):
        check_data_spec("--data", str(path))
    with pytest.raises(DataError, match="unsupported file type"):
        read_rows(path)
