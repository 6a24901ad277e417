"""Turn raw rows into typed records: format detection, validation with precise messages, and splitting.

Preference formats (see ``detect_format``):

* ``standard``: ``prompt``, ``chosen``, ``rejected`` strings (the prompt may be empty);
* ``conversational``: ``prompt`` a non-empty list of ``{"role", "content"}`` messages; ``chosen`` and
  ``rejected`` a message, a list of messages or a string, all normalised to a list of messages;
* ``implicit``: Anthropic-HH style ``chosen``/``rejected`` transcripts without a prompt column;
* ``ranked``: ``prompt`` + ``responses`` + ``scores``, expanded into every strictly ordered pair;
* ``completion``: ``prompt`` + ``completion`` (SFT only);
* ``unpaired``: ``prompt`` + ``completion`` + a boolean ``label`` (desirable or not): KTO's data (``--loss kto``);
  prompt and completion as in ``completion`` (strings, or a message list and its assistant reply).
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from tqdm.auto import tqdm

from dpokit.data.images import read_images, with_placeholders
from dpokit.data.messages import _message, _messages, _string, _type_name, has_text, read_tools
from dpokit.data.records import Completion, PreferencePair
from dpokit.data.sources import read_rows
from dpokit.errors import ConfigError, DataError

FORMATS = ("standard", "conversational", "implicit", "ranked", "completion", "unpaired")
HH_MARKER = "\n\nAssistant:"
TIE_REASON = "ties in ranked responses"

T = TypeVar("T")


@dataclass
class ColumnMap:
    """Names of the columns that hold each field (change them for data sets with other names)."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    responses: str = "responses"
    scores: str = "scores"
    completion: str = "completion"
    label: str = "label"
    tools: str = "tools"  # optional: the tool schemas the chat template is given (see dpokit.data.messages)
    images: str = "images"  # optional: the row's images (see dpokit.data.images)


@dataclass
class LoadReport:
    """What loading read: the number of rows, the detected or forced format, and dropped items.

    ``counts`` maps a reason to how many items were dropped for it at this layer; only ranked ties
    (``"ties in ranked responses"``, counted per tied pair of responses) are dropped here.
    """

    source: str
    format: str
    rows: int = 0
    counts: dict[str, int] = field(default_factory=dict)


def detect_format(row: dict, columns: ColumnMap | None = None) -> str:
    """Return the format of ``row``: one of ``standard``, ``conversational``, ``implicit``, ``ranked``,
    ``completion``, ``unpaired``. Raises :class:`DataError` (without provenance) when no format fits."""
    c = columns or ColumnMap()
    if c.responses in row and c.scores in row:
        return "ranked"
    if c.chosen in row and c.rejected in row:
        if c.prompt not in row:
            return "implicit"
        return "conversational" if isinstance(row[c.prompt], list) else "standard"
    if c.prompt in row and c.completion in row:
        return "unpaired" if c.label in row else "completion"
    raise DataError(
        f"cannot detect the data format from columns {sorted(row)}; expected "
        f"{c.prompt!r}+{c.chosen!r}+{c.rejected!r}, {c.chosen!r}+{c.rejected!r}, "
        f"{c.prompt!r}+{c.responses!r}+{c.scores!r}, {c.prompt!r}+{c.completion!r} "
        f"or {c.prompt!r}+{c.completion!r}+{c.label!r}"
    )


def load_preferences(
    spec: str | os.PathLike,
    *,
    format: str = "auto",
    columns: ColumnMap | None = None,
    split: str = "train",
) -> tuple[list[PreferencePair], LoadReport]:
    """Read ``spec`` (see :func:`read_rows`) into preference pairs, validating every row.

    The format is detected from the first row unless forced with ``format``; every row must then fit it.
    Identical chosen/rejected pairs are returned as they are (filtering them is the caller's job).
    """
    pairs, report = stream_preferences(spec, format=format, columns=columns, split=split)
    return list(pairs), report


def load_completions(
    spec: str | os.PathLike,
    *,
    format: str = "auto",
    columns: ColumnMap | None = None,
    split: str = "train",
) -> tuple[list[Completion], LoadReport]:
    """Read ``spec`` into SFT examples: prompt/completion data, or preference data using prompt + chosen
    ("Preferred-FT"); implicit-prompt rows are split as for DPO and ranked rows use their highest-scored
    response (the first one on a tie)."""
    items, report = stream_completions(spec, format=format, columns=columns, split=split)
    return list(items), report


def stream_preferences(
    spec: str | os.PathLike,
    *,
    format: str = "auto",
    columns: ColumnMap | None = None,
    split: str = "train",
    streaming: bool = False,
) -> tuple[Iterator[PreferencePair], LoadReport]:
    """:func:`load_preferences` one row at a time: an iterator over the pairs, and the report it fills in as it
    is consumed (complete once the iterator is exhausted). Nothing is kept between rows. A missing file or an
    unknown format raises at once; a bad row, or a data set without pairs, while iterating. `streaming` reads a
    Hub data set without downloading it first (see :func:`read_rows`)."""
    c = columns or ColumnMap()
    base = _base_dir(spec)

    def convert(row: dict, prov: str, fmt: str, report: LoadReport) -> Iterator[PreferencePair]:
        if fmt == "unpaired":
            raise DataError(f"{prov}: unpaired data (prompt, completion, label) has no preference pairs; "
                            "train it with --loss kto")
        if fmt == "completion":
            raise DataError(
                f"{prov}: prompt/completion data has no preferences; "
                f"DPO needs {c.chosen!r} and {c.rejected!r} (or {c.responses!r} and {c.scores!r})"
            )
        if fmt == "ranked":
            prompt, responses, scores = _ranked(row, prov, c)
            images = read_images(row.get(c.images), c.images, prov, base)
            prompt = with_placeholders(prompt, images, c.prompt, prov, c.images)
            for i in range(len(responses)):
                for j in range(i + 1, len(responses)):
                    if scores[i] == scores[j]:
                        report.counts[TIE_REASON] = report.counts.get(TIE_REASON, 0) + 1
                        continue
                    hi, lo = (i, j) if scores[i] > scores[j] else (j, i)
                    yield PreferencePair(prompt, responses[hi], responses[lo], f"{prov} pair ({i},{j})",
                                         _tools(row, prov, c), images)
            return
        prompt, chosen, rejected = _prompt_chosen_rejected(row, prov, fmt, c)
        images = read_images(row.get(c.images), c.images, prov, base)
        prompt = with_placeholders(prompt, images, c.prompt, prov, c.images)
        yield PreferencePair(prompt, chosen, rejected, source=prov, tools=_tools(row, prov, c), images=images)

    def none_left(report: LoadReport) -> None:
        raise DataError(f"{report.source}: no preference pairs ({report.rows} rows, dropped: {report.counts})")

    return _stream(spec, format, c, split, streaming, convert, none_left)


def stream_completions(
    spec: str | os.PathLike,
    *,
    format: str = "auto",
    columns: ColumnMap | None = None,
    split: str = "train",
    streaming: bool = False,
) -> tuple[Iterator[Completion], LoadReport]:
    """:func:`load_completions` one row at a time (see :func:`stream_preferences`)."""
    c = columns or ColumnMap()
    base = _base_dir(spec)

    def convert(row: dict, prov: str, fmt: str, report: LoadReport) -> Iterator[Completion]:
        if fmt == "unpaired":
            raise DataError(f"{prov}: unpaired data (prompt, completion, label) is for --loss kto; to fine-tune on "
                            "every completion whatever its label, pass --format completion")
        if fmt == "completion":
            prompt, completion = _prompt_completion(row, prov, c, fmt)
        elif fmt == "ranked":
            prompt, responses, scores = _ranked(row, prov, c)
            completion = responses[max(range(len(scores)), key=lambda k: (scores[k], -k))]
        else:
            prompt, completion, _ = _prompt_chosen_rejected(row, prov, fmt, c)
        images = read_images(row.get(c.images), c.images, prov, base)
        prompt = with_placeholders(prompt, images, c.prompt, prov, c.images)
        yield Completion(prompt, completion, prov, tools=_tools(row, prov, c), images=images)

    return _stream(spec, format, c, split, streaming, convert, None)


def load_unpaired(
    spec: str | os.PathLike,
    *,
    format: str = "auto",
    columns: ColumnMap | None = None,
    split: str = "train",
) -> tuple[list[Completion], LoadReport]:
    """Read ``spec`` into unpaired examples for KTO: :class:`Completion` records whose ``label`` says whether the
    completion is desirable. Only the ``unpaired`` format fits; a row without a boolean label is an error."""
    c = columns or ColumnMap()

    def convert(row: dict, prov: str, fmt: str, report: LoadReport) -> Iterator[Completion]:
        _no_images(row, prov, c, "unpaired (KTO) data")
        if fmt != "unpaired":
            raise DataError(f"{prov}: --loss kto needs unpaired data ({c.prompt!r}, {c.completion!r} and a "
                            f"true/false {c.label!r}); this is {fmt} data")
        prompt, completion = _prompt_completion(row, prov, c, fmt)
        label = _need(row, c.label, prov, fmt)
        if not isinstance(label, bool):
            raise DataError(f"{prov}: field {c.label!r} must be true or false, got {label!r}")
        yield Completion(prompt, completion, prov, label, _tools(row, prov, c))

    items, report = _stream(spec, format, c, split, False, convert, None)
    return list(items), report


# --- internals -------------------------------------------------------------------------------------

def _stream(
    spec: str | os.PathLike,
    format: str,
    c: ColumnMap,
    split: str,
    streaming: bool,
    convert: Callable[[dict, str, str, LoadReport], Iterator[T]],
    none_left: Callable[[LoadReport], None] | None,
) -> tuple[Iterator[T], LoadReport]:
    if format != "auto" and format not in FORMATS:
        raise ConfigError(f"unknown data format {format!r}; choose auto or one of: {', '.join(FORMATS)}")
    source = os.fspath(spec)
    report = LoadReport(source=source, format=format)
    rows = read_rows(spec, split, streaming=streaming)  # resolves the spec now: a missing file fails here

    def records() -> Iterator[T]:
        yielded = False
        # a progress bar (rows read) for data sets that take more than a second to read
        bar = tqdm(rows, desc=f"reading {source}", unit=" rows", delay=1.0, mininterval=0.5)
        try:
            for row, prov in bar:
                if report.rows == 0 and format == "auto":
                    try:
                        report.format = detect_format(row, c)
                    except DataError as e:
                        raise DataError(f"{prov}: {e}") from None
                report.rows += 1
                for record in convert(row, prov, report.format, report):
                    yielded = True
                    yield record
        finally:
            bar.close()
        if report.rows == 0:
            raise DataError(f"{source}: the data set has no rows")
        if not yielded and none_left is not None:
            none_left(report)

    return records(), report


def _base_dir(spec: str | os.PathLike) -> str | None:
    """The directory relative image paths of a local data file (or directory) are read from; None for the Hub."""
    path = os.fspath(spec)
    if os.path.isdir(path):
        return path
    return os.path.dirname(os.path.abspath(path)) if os.path.isfile(path) else None


def _no_images(row: dict, prov: str, c: ColumnMap, what: str) -> None:
    if row.get(c.images):
        raise DataError(f"{prov}: field {c.images!r}: images are supported in preference and SFT data (dpokit dpo, "
                        f"sft, eval) only, not in {what}")


def _need(row: dict, name: str, prov: str, fmt: str) -> Any:
    if name not in row:
        raise DataError(f"{prov}: missing field {name!r} ({fmt} format)")
    return row[name]


def _tools(row: dict, prov: str, c: ColumnMap) -> list | None:
    """The row's tool schemas (its optional tools column), or None."""
    return read_tools(row.get(c.tools), c.tools, prov)


def _response(row: dict, name: str, prov: str, *, conversational: bool, fmt: str = "completion") -> Any:
    """A response column: a non-empty string, or (conversational) a list of messages."""
    value = _need(row, name, prov, fmt)
    if not conversational:
        return _string(value, name, prov)
    if isinstance(value, str):
        return [{"role": "assistant", "content": _string(value, name, prov)}]
    messages = [_message(value, name, prov)] if isinstance(value, dict) else _messages(value, name, prov)
    for i, m in enumerate(messages):  # every token of a response is scored: it must all be the assistant's
        if m["role"] != "assistant":
            where = name if isinstance(value, dict) else f"{name}[{i}]"
            raise DataError(f"{prov}: field '{where}.role' is {m['role']!r}: a response holds only assistant "
                            "messages (its tokens are the ones scored); earlier turns belong in the prompt")
    if not has_text(messages):
        raise DataError(f"{prov}: field {name!r} is empty")
    return messages


def _prompt(row: dict, prov: str, c: ColumnMap, *, conversational: bool | None, fmt: str = "completion") -> Any:
    """The prompt: a string (may be empty) or a non-empty message list; ``None`` accepts either."""
    value = _need(row, c.prompt, prov, fmt)
    if conversational or (conversational is None and isinstance(value, list)):
        return _messages(value, c.prompt, prov)
    return _string(value, c.prompt, prov, allow_empty=True)


def _prompt_completion(row: dict, prov: str, c: ColumnMap, fmt: str) -> tuple[Any, Any]:
    """The prompt and completion of a ``completion`` or ``unpaired`` row: strings, or a message list and the
    assistant reply to it."""
    prompt = _prompt(row, prov, c, conversational=None, fmt=fmt)
    return prompt, _response(row, c.completion, prov, conversational=isinstance(prompt, list), fmt=fmt)


def _prompt_chosen_rejected(row: dict, prov: str, fmt: str, c: ColumnMap) -> tuple[Any, Any, Any]:
    if fmt == "implicit":
        chosen = _string(_need(row, c.chosen, prov, fmt), c.chosen, prov)
        rejected = _string(_need(row, c.rejected, prov, fmt), c.rejected, prov)
        return _split_implicit(chosen, rejected, prov, c)
    conv = fmt == "conversational"
    prompt = _prompt(row, prov, c, conversational=conv, fmt=fmt)
    chosen = _response(row, c.chosen, prov, conversational=conv, fmt=fmt)
    rejected = _response(row, c.rejected, prov, conversational=conv, fmt=fmt)
    return prompt, chosen, rejected


def _split_implicit(chosen: str, rejected: str, prov: str, c: ColumnMap) -> tuple[str, str, str]:
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    idx = chosen.rfind(HH_MARKER, 0, n)
    if idx < 0:
        raise DataError(f"{prov}: {c.chosen} and {c.rejected} do not share a prompt ending in {HH_MARKER!r}")
    cut = idx + len(HH_MARKER)
    # Keep the responses exactly (HH responses start with a space that belongs to them).
    prompt, ch, rj = chosen[:cut], chosen[cut:], rejected[cut:]
    _string(ch, c.chosen, prov)
    _string(rj, c.rejected, prov)
    return prompt, ch, rj


def _ranked(row: dict, prov: str, c: ColumnMap) -> tuple[Any, list, list[float]]:
    prompt = _prompt(row, prov, c, conversational=None, fmt="ranked")
    conv = isinstance(prompt, list)
    responses = _need(row, c.responses, prov, "ranked")
    scores = _need(row, c.scores, prov, "ranked")
    for name, value in ((c.responses, responses), (c.scores, scores)):
        if not isinstance(value, list):
            raise DataError(f"{prov}: field {name!r} must be a list, got {_type_name(value)}")
    if len(responses) < 2:
        raise DataError(f"{prov}: field {c.responses!r} must hold at least 2 responses, got {len(responses)}")
    if len(scores) != len(responses):
        raise DataError(f"{prov}: field {c.scores!r} has {len(scores)} items but {c.responses!r} has {len(responses)}")
    out = []
    for i, r in enumerate(responses):
        text = _string(r, f"{c.responses}[{i}]", prov)
        # Keep record typing uniform: responses to a chat prompt are assistant message lists.
        out.append([{"role": "assistant", "content": text}] if conv else text)
    for i, s in enumerate(scores):
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            raise DataError(f"{prov}: field '{c.scores}[{i}]' must be a finite number, got {s!r}")
    return prompt, out, scores


def eval_indices(n: int, fraction: float, seed: int) -> set[int]:
    """The positions of the eval items when ``n`` items are split by :func:`split_eval` (the same rule, for
    callers that see the items one at a time)."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ConfigError(f"eval fraction must be a number between 0 and 1 (exclusive), got {fraction!r}")
    n_eval = int(n * fraction + 0.5)  # round half up, not Python's banker's rounding
    if n_eval < 1 or n - n_eval < 1:
        raise ConfigError(
            f"eval fraction {fraction} of {n} items gives {n_eval} eval and {n - n_eval} train items; "
            "each part needs at least 1"
        )
    return set(random.Random(seed).sample(range(n), n_eval))


def split_eval(items: list[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Split ``items`` into ``(train, eval)`` with ``round(len(items) * fraction)`` eval items.

    The eval indices are drawn with ``random.Random(seed)``, so the split is deterministic for a given
    seed and length; both parts keep the original order. Raises :class:`ConfigError` unless
    ``0 < fraction < 1`` and both parts get at least one item.
    """
    chosen = eval_indices(len(items), fraction, seed)
    train = [x for i, x in enumerate(items) if i not in chosen]
    evals = [x for i, x in enumerate(items) if i in chosen]
    return train, evals
