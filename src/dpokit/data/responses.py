"""Responses to score (``dpokit score``: a prompt and one response per row) or to rank (``dpokit rank``: a prompt
and its candidate responses), validated with the same rules and messages as training data (dpokit.data.formats).

A prompt is a string (may be empty) or a non-empty list of chat messages; a response to a string prompt is a
non-empty string, a response to a chat prompt a string, an assistant message or a list of assistant messages.
A row may carry a ``tools`` column (tool schemas, read and checked as training reads them:
dpokit.data.messages.read_tools), which the chat template renders with the conversation.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from dpokit.data.formats import ColumnMap, _prompt, _response, _type_name
from dpokit.data.images import refuse_images
from dpokit.data.messages import read_tools
from dpokit.data.records import Text
from dpokit.data.sources import read_rows
from dpokit.errors import DataError


@dataclass(frozen=True)
class ResponseRow:
    """One row: its prompt and responses as tokenisation takes them, the values as the row gave them (written
    back to the output unchanged), the row's provenance ("data.jsonl:12") and its tool schemas (None: no tools)."""

    prompt: Text
    responses: tuple[Text, ...]
    given_prompt: Any
    given_responses: tuple[Any, ...]
    source: str
    list_column: str | None = None  # the column of a candidate list (rank); None: one response (score)
    tools: list[dict] | None = None

    def response_sources(self) -> list[str]:
        """A distinct name for each response, for error messages ("data.jsonl:3 responses[1]")."""
        if self.list_column is None:
            return [self.source]
        return [f"{self.source} {self.list_column}[{j}]" for j in range(len(self.responses))]


def _prompted_rows(spec: str | os.PathLike, split: str, prompt_column: str, fmt: str
                   ) -> Iterator[tuple[dict, str, Text, list[dict] | None]]:
    """Each row of `spec` with its provenance, its checked prompt and its tools; a data set without rows is an
    error."""
    columns = ColumnMap(prompt=prompt_column)
    count = 0
    for row, prov in read_rows(spec, split):
        count += 1
        refuse_images(row, prov, fmt)  # fmt: "score" or "rank", the command
        prompt = _prompt(row, prov, columns, conversational=None, fmt=fmt)
        yield row, prov, prompt, read_tools(row.get(columns.tools), columns.tools, prov)
    if count == 0:
        raise DataError(f"{os.fspath(spec)}: the data set has no rows")


def read_responses(spec: str | os.PathLike, *, split: str = "train", column: str = "response",
                   prompt_column: str = "prompt") -> list[ResponseRow]:
    """Rows ``{"prompt", "response"}`` (and optionally ``"tools"``) of `spec` (any file or data set dpokit reads),
    one response each."""
    out = []
    for row, prov, prompt, tools in _prompted_rows(spec, split, prompt_column, "score"):
        response = _response(row, column, prov, conversational=isinstance(prompt, list), fmt="score")
        out.append(ResponseRow(prompt, (response,), row[prompt_column], (row[column],), prov, tools=tools))
    return out


def read_candidates(spec: str | os.PathLike, *, split: str = "train", column: str = "responses",
                    prompt_column: str = "prompt") -> list[ResponseRow]:
    """Rows ``{"prompt", "responses": [...]}`` (and optionally ``"tools"``) of `spec`, one or more candidate
    responses each."""
    out = []
    for row, prov, prompt, tools in _prompted_rows(spec, split, prompt_column, "rank"):
        given = row.get(column)
        if column not in row:
            raise DataError(f"{prov}: missing field {column!r} (rank format)")
        if not isinstance(given, list):
            raise DataError(f"{prov}: field {column!r} must be a list of responses, got {_type_name(given)}")
        if not given:
            raise DataError(f"{prov}: field {column!r} is empty")
        chat = isinstance(prompt, list)
        responses = tuple(_response({f"{column}[{j}]": r}, f"{column}[{j}]", prov, conversational=chat, fmt="rank")
                          for j, r in enumerate(given))
        out.append(ResponseRow(prompt, responses, row[prompt_column], tuple(given), prov, column, tools))
    return out
