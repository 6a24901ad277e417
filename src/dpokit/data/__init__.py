"""Data loading: read rows from files, saved datasets or the Hub, and turn them into typed records."""

from dpokit.data.formats import (ColumnMap, LoadReport, detect_format, load_completions, load_preferences,
                                  load_unpaired, split_eval)
from dpokit.data.records import Completion, PreferencePair
from dpokit.data.sources import read_rows

__all__ = [
    "read_rows",
    "ColumnMap",
    "detect_format",
    "load_preferences",
    "load_completions",
    "load_unpaired",
    "split_eval",
    "LoadReport",
    "PreferencePair",
    "Completion",
]
