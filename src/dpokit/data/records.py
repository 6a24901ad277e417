"""Typed records: what every data source and format is turned into, with provenance for error messages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

Message = dict  # {"role": str, "content": str}
Text = Union[str, list[Message]]  # plain text, or chat messages rendered later with the chat template


@dataclass(frozen=True)
class PreferencePair:
    """One preference: `chosen` is preferred to `rejected` as a continuation of `prompt`.

    `prompt` is a string, or a list of chat messages; `chosen` and `rejected` are strings, or lists of
    assistant messages when the prompt is conversational. `source` says where the record came from
    ("data.jsonl:12" or "dataset[train] row 11") so that later errors can name it.
    """

    prompt: Text
    chosen: Text
    rejected: Text
    source: str = ""


@dataclass(frozen=True)
class Completion:
    """One supervised example for SFT: `completion` continues `prompt` (same typing rules as PreferencePair).

    `label` is None for SFT data; in unpaired data (KTO) it says whether the completion is desirable."""

    prompt: Text
    completion: Text
    source: str = ""
    label: bool | None = None
