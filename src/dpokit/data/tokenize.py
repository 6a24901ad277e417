"""Records -> token ids: chat templates, EOS, truncation and filtering.

The rules, which tests/data/test_tokenize.py pins down:

* **Boundary.** The prompt and each response are tokenised *separately* and concatenated, so the response
  tokens that are scored are exactly the tokens the model would emit after being given the prompt ids. The
  prompt gets the tokenizer's own special tokens (a BOS where the tokenizer adds one, as at generation
  time); responses get none. An empty prompt becomes the BOS (or EOS, GPT-2 style) token, so that the first
  response token has a position that predicts it.
* **EOS.** The EOS token is appended to every response, unless the response already ends with a special
  token (a chat template's end-of-turn marker, say).
* **Chat.** Conversational records are rendered with the tokenizer's chat template: the prompt (any number of
  system/user/assistant turns) with ``add_generation_prompt=True``, each response (one or more assistant
  messages) as the text the full conversation adds after it, trailing whitespace stripped; so the scored tokens
  are exactly the final assistant turn(s) the template renders, through its end-of-turn token. With
  ``apply_chat_template`` a plain-text record is first wrapped as a conversation (prompt = one user turn,
  response = one assistant turn) and then tokenised exactly like conversational data.
* **Truncation.** If prompt + longest response exceeds ``max_length``, the prompt is cut to
  ``max_prompt_length`` tokens, keeping its end (``keep_end``, right for dialogue) or its start
  (``keep_start``); a leading BOS is kept either way. Responses are never cut (a cut response loses its
  EOS and teaches the model to stop mid-sentence): an example that still does not fit is filtered.
* **Filtering.** Pairs whose responses are identical, and examples too long after prompt truncation, are
  counted by reason; ``on_filtered="skip"`` drops them and reports the counts, ``"error"`` fails the run.

How (the rules above are the contract; this is only speed and memory): records are tokenised in chunks of
``chunk_size`` by dpokit.data.arrays (one batched call of the fast tokenizer per kind of text, then numpy
operations on the chunk's flat token array), and the kept examples of a chunk come out as a
:class:`~dpokit.data.arrays.TokenArrays` (flat token ids + lengths: what the on-disk cache of dpokit.data.cache
stores) before they become :class:`TokenizedExample` tuples. The tuples share one Python int object per token id,
so an example costs 8 bytes per token in memory instead of ~40.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from dpokit.data.arrays import ChunkContext, TokenArrays, tokenize_chunk
from dpokit.data.chat import has_chat_template
from dpokit.config.data import TokenizeOptions
from dpokit.config.options import options_of
from dpokit.data.records import Completion, PreferencePair
from dpokit.errors import ConfigError, DataError

# Bump when a change of the rules changes the token ids of any record: cached tokenised data is keyed on it.
RULES_VERSION = 3  # 2: tokens added as special outside the named slots count as special (no EOS after them)
# 3: a row's tools column goes to the chat template
_OPTIONS = {f.name: f for f in options_of(TokenizeOptions)}
TRUNCATION_MODES = _OPTIONS["truncation"].metadata["choices"]
FILTER_POLICIES = _OPTIONS["on_filtered"].metadata["choices"]
LONG_ROW_POLICIES = _OPTIONS["on_long_rows"].metadata["choices"]


@dataclass(frozen=True)
class TokenizeConfig:
    """How records become token ids (see the module docstring for the rules)."""

    max_length: int = int(_OPTIONS["max_length"].default)  # the defaults are the options' (dpokit.config.data)
    max_prompt_length: int = int(_OPTIONS["max_prompt_length"].default)
    truncation: str = _OPTIONS["truncation"].default
    on_filtered: str = _OPTIONS["on_filtered"].default
    apply_chat_template: bool = _OPTIONS["apply_chat_template"].default  # plain text as a user and an assistant turn
    on_long_rows: str = _OPTIONS["on_long_rows"].default  # a text no max_length could use: cut it, or fail

    def __post_init__(self) -> None:
        if self.truncation not in TRUNCATION_MODES:
            raise ConfigError(f"truncation must be one of {TRUNCATION_MODES}, got {self.truncation!r}")
        if self.on_filtered not in FILTER_POLICIES:
            raise ConfigError(f"on_filtered must be one of {FILTER_POLICIES}, got {self.on_filtered!r}")
        if self.on_long_rows not in LONG_ROW_POLICIES:
            raise ConfigError(f"on_long_rows must be one of {LONG_ROW_POLICIES}, got {self.on_long_rows!r}")
        if not 0 < self.max_prompt_length < self.max_length:
            raise ConfigError(
                f"need 0 < max_prompt_length < max_length, got {self.max_prompt_length} and {self.max_length}"
            )


@dataclass(frozen=True)
class TokenizedExample:
    """A prompt and its responses as token ids: (chosen, rejected) for DPO, (completion,) for SFT."""

    prompt_ids: tuple[int, ...]
    responses: tuple[tuple[int, ...], ...]
    source: str = ""

    @property
    def length(self) -> int:
        """Tokens in the shared-prompt layout: the prompt once, then every response."""
        return len(self.prompt_ids) + sum(len(r) for r in self.responses)


@dataclass
class FilterReport:
    """What tokenisation kept and what it filtered, by reason, with a few sources per reason."""

    kept: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    prompts_truncated: int = 0
    rows_cut: int = 0  # texts longer than max_length could use, cut before tokenising (on_long_rows="cut")
    rows_cut_examples: list[str] = field(default_factory=list)

    def add(self, reason: str, source: str) -> None:
        """Count one filtered example under `reason`."""
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(source)

    @property
    def filtered(self) -> int:
        """Total number of filtered examples."""
        return sum(self.counts.values())

    def summary(self) -> str:
        """One line for the log: kept, truncated and filtered counts."""
        parts = [f"kept {self.kept}"]
        if self.prompts_truncated:
            parts.append(f"prompt truncated in {self.prompts_truncated}")
        if self.rows_cut:
            parts.append(f"cut {self.rows_cut} row(s) longer than max_length could use before tokenising "
                         f"(e.g. {', '.join(self.rows_cut_examples)})")
        for reason, n in sorted(self.counts.items()):
            parts.append(f"filtered {n} ({reason}; e.g. {', '.join(self.examples[reason])})")
        return "; ".join(parts)


def plain_text_warning(records: Sequence[PreferencePair | Completion], tokenizer: PreTrainedTokenizerBase,
                       config: TokenizeConfig) -> str | None:
    """The warning for plain-text (standard-format) records tokenised as raw text although the tokenizer has a
    chat template (the prompt and response are then glued with no turn markers), or None when there is none."""
    if config.apply_chat_template or not has_chat_template(tokenizer):
        return None
    return plain_text_message(sum(isinstance(r.prompt, str) for r in records), len(records), tokenizer, config)


def plain_text_message(plain: int, total: int, tokenizer: PreTrainedTokenizerBase,
                       config: TokenizeConfig) -> str | None:
    """:func:`plain_text_warning` from counts: `plain` of `total` records are plain text (for streamed records)."""
    if not plain or config.apply_chat_template or not has_chat_template(tokenizer):
        return None
    return (f"warning: {plain} of {total} examples are plain text but the tokenizer has a chat template: "
            "they are tokenised as raw text (prompt and response run together, no turn markers); pass "
            "--apply-chat-template to render each prompt as a user turn and each response as the assistant turn")


# One shared Python int per token id: tuples built from it hold 8-byte references instead of a fresh 32-byte int
# object per token (ids above 256 are not cached by CPython).
_INTS = np.arange(0, dtype=object)


def _shared_ints(ids: np.ndarray) -> list[int]:
    global _INTS
    if len(ids) == 0:
        return []
    top = int(ids.max())
    if top >= len(_INTS):
        _INTS = np.arange(max(top + 1, 2 * len(_INTS), 1024), dtype=object)
    return _INTS[ids].tolist()


def examples_from_arrays(arrays: TokenArrays) -> list[TokenizedExample]:
    """The TokenizedExamples that `arrays` holds (the inverse of what tokenisation flattened)."""
    n = len(arrays)
    if n == 0:
        return []
    ints = _shared_ints(arrays.tokens)
    counts = arrays.response_counts
    # segment lengths in order: prompt, its responses, next prompt, ...
    segments = np.empty(n + len(arrays.response_lengths), dtype=np.int64)
    prompt_slots = np.arange(n) + np.concatenate(([0], np.cumsum(counts[:-1], dtype=np.int64)))
    is_prompt = np.zeros(len(segments), dtype=bool)
    is_prompt[prompt_slots] = True
    segments[is_prompt] = arrays.prompt_lengths
    segments[~is_prompt] = arrays.response_lengths
    ends = np.cumsum(segments).tolist()
    starts = [0] + ends[:-1]
    parts = [tuple(ints[a:b]) for a, b in zip(starts, ends)]
    sources = arrays.sources
    k = int(counts[0])
    if (counts == k).all():
        step = k + 1
        return [TokenizedExample(parts[i], tuple(parts[i + 1 : i + step]), sources[j])
                for j, i in enumerate(range(0, len(parts), step))]
    out, i = [], 0
    for j, c in enumerate(counts.tolist()):
        out.append(TokenizedExample(parts[i], tuple(parts[i + 1 : i + 1 + c]), sources[j]))
        i += 1 + c
    return out


def _tokenize_chunk(records: Sequence[PreferencePair | Completion], ctx: ChunkContext,
                    report: FilterReport) -> TokenArrays:
    """The kept examples of one chunk of records; what it filtered and truncated is counted in `report`."""
    chunk = tokenize_chunk(records, ctx)
    report.prompts_truncated += chunk.prompts_truncated
    report.rows_cut += len(chunk.cut)
    report.rows_cut_examples += chunk.cut[: 3 - len(report.rows_cut_examples)]
    for reason, source in chunk.filtered:
        report.add(reason, source)
    return chunk.arrays


class ChunkTokenizer:
    """Tokenises one chunk of records at a time under the module's rules, for callers that see the records as a
    stream (dpokit.data.streaming): the same chunks give the same arrays as :func:`tokenize_arrays`."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, config: TokenizeConfig):
        self._ctx = ChunkContext(tokenizer, config)

    def __call__(self, records: Sequence[PreferencePair | Completion], report: FilterReport) -> TokenArrays:
        """The kept examples of `records`; filtered ones are counted in `report`."""
        return _tokenize_chunk(records, self._ctx, report)


def tokenize_arrays(
    records: Sequence[PreferencePair | Completion],
    tokenizer: PreTrainedTokenizerBase,
    config: TokenizeConfig,
    report: FilterReport,
    *,
    description: str = "tokenising",
    chunk_size: int = 1000,
) -> Iterator[TokenArrays]:
    """The kept examples of `records`, a chunk of `chunk_size` records at a time (counts go to `report`).

    Shows a progress bar (records) for 2000 records or more. Does not apply ``on_filtered``: see
    :func:`tokenize_examples`.
    """
    ctx = ChunkContext(tokenizer, config)
    with tqdm(total=len(records), desc=description, unit="ex", disable=len(records) < 2000) as bar:
        for lo in range(0, len(records), chunk_size):
            chunk = records[lo : lo + chunk_size]
            yield _tokenize_chunk(chunk, ctx, report)
            bar.update(len(chunk))


def release_freed_memory() -> None:
    """Hand memory that Python has freed back to the OS (glibc's malloc_trim; nothing elsewhere).

    Raw records and tokenizer output freed after tokenisation sit in the C heap between the examples' tuples, where
    glibc keeps them (over 1 GB after 200k pairs) unless asked to return the free pages."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def check_report(report: FilterReport, config: TokenizeConfig) -> None:
    """Raise DataError when `config.on_filtered == "error"` and anything was filtered, or when nothing is left."""
    if report.filtered and config.on_filtered == "error":
        raise DataError(f"{report.summary()} (pass --on-filtered skip to drop them instead)")
    if not report.kept:
        raise DataError(f"no usable examples left after tokenisation: {report.summary()}")


def tokenize_examples(
    records: Sequence[PreferencePair | Completion],
    tokenizer: PreTrainedTokenizerBase,
    config: TokenizeConfig,
    *,
    description: str = "tokenising",
    chunk_size: int = 1000,
    sink: Callable[[TokenArrays], None] | None = None,
) -> tuple[list[TokenizedExample], FilterReport]:
    """Tokenise preference pairs (two responses) or completions (one) under the module's rules.

    Raises DataError naming the first offenders when `config.on_filtered == "error"` and anything was
    filtered; otherwise drops them and reports the counts in the returned FilterReport. `sink`, if given,
    receives every chunk's kept examples as :class:`TokenArrays` (the data cache writes them to disk).
    """
    report = FilterReport()
    examples: list[TokenizedExample] = []
    for arrays in tokenize_arrays(records, tokenizer, config, report, description=description,
                                  chunk_size=chunk_size):
        if sink is not None:
            sink(arrays)
        examples.extend(examples_from_arrays(arrays))
    report.kept = len(examples)
    check_report(report, config)
    return examples, report
