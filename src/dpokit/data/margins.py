"""Per-pair margins for a reward model's loss (`dpokit reward --margin-column`): a number per row, read beside the
preference pairs and matched to the tokenised examples by their source (file and line), so that whatever was
filtered, split off for evaluation or read back from the tokenised-data cache, each pair keeps its row's margin."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from dpokit.data.sources import read_rows
from dpokit.errors import DataError

RANKED_PAIR = " pair ("  # the pairs of a ranked row are its source plus " pair (i,j)" (dpokit.data.formats)


def _number(value: object, where: str, column: str) -> float:
    if isinstance(value, str):  # CSV cells are text
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{where}: margin column {column!r} must be a finite number, got {value!r}")
    return float(value)


def read_margins(spec: str | os.PathLike, column: str, split: str = "train") -> dict[str, float]:
    """The margin of every row of `spec`, by the row's source; a row without a finite number in `column` is a
    DataError naming it."""
    margins = {}
    for row, source in read_rows(spec, split):
        if column not in row:
            raise DataError(f"{source}: no margin column {column!r} (columns: {', '.join(sorted(map(str, row)))})")
        margins[source] = _number(row[column], source, column)
    return margins


def example_margins(margins: dict[str, float], sources: Sequence[str]) -> list[float]:
    """The margins of the examples whose sources are `sources`, in order (each pair of a ranked row takes the
    row's margin)."""
    out = []
    for source in sources:
        value = margins.get(source)
        if value is None:
            value = margins.get(source.split(RANKED_PAIR)[0])
        if value is None:
            raise DataError(f"{source}: no margin read for this example")
        out.append(value)
    return out
