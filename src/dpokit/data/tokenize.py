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
``chunk_size`` with one batched call of the fast tokenizer per kind of text (plain prompts, chat prompts,
responses; a text repeated inside a chunk, such as the prompt of a ranked row's pairs, is tokenised once). EOS
appending, prompt truncation and filtering are numpy operations on the chunk's flat token array, and the kept
examples of a chunk come out as a :class:`TokenArrays` (flat token ids + lengths: what the on-disk cache of
dpokit.data.cache stores) before they become :class:`TokenizedExample` tuples. The tuples share one Python int
object per token id, so an example costs 8 bytes per token in memory instead of ~40.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from dpokit.data.chat import _special_ids, _start_token, assistant_turn, has_chat_template, render_chat, user_turn
from dpokit.data.records import Completion, PreferencePair, Text
from dpokit.errors import ConfigError, DataError

# Bump when a change of the rules changes the token ids of any record: cached tokenised data is keyed on it.
RULES_VERSION = 2  # 2: tokens added as special outside the named slots count as special (no EOS after them)
TRUNCATION_MODES = ("keep_end", "keep_start")
FILTER_POLICIES = ("skip", "error")


@dataclass(frozen=True)
class TokenizeConfig:
    """How records become token ids (see the module docstring for the rules)."""

    max_length: int = 512
    max_prompt_length: int = 256
    truncation: str = "keep_end"
    on_filtered: str = "skip"
    apply_chat_template: bool = False  # wrap plain-text records as a user turn and an assistant turn

    def __post_init__(self) -> None:
        if self.truncation not in TRUNCATION_MODES:
            raise ConfigError(f"truncation must be one of {TRUNCATION_MODES}, got {self.truncation!r}")
        if self.on_filtered not in FILTER_POLICIES:
            raise ConfigError(f"on_filtered must be one of {FILTER_POLICIES}, got {self.on_filtered!r}")
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


@dataclass
class TokenArrays:
    """Kept examples as flat arrays: every example's prompt ids, then its responses' ids, one after another.

    ``prompt_lengths[i]`` and ``response_counts[i]`` describe example i; ``response_lengths`` holds the length of
    every response in order (``response_counts.sum()`` of them); ``sources`` the examples' provenance.
    """

    tokens: np.ndarray  # int32 (or uint16 on disk), flat
    prompt_lengths: np.ndarray  # int32 [n]
    response_counts: np.ndarray  # int32 [n]
    response_lengths: np.ndarray  # int32 [sum(response_counts)]
    sources: list[str]

    def __len__(self) -> int:
        return len(self.prompt_lengths)

    @staticmethod
    def concat(parts: Sequence[TokenArrays]) -> TokenArrays:
        """One TokenArrays holding the examples of `parts` in order."""
        return TokenArrays(np.concatenate([p.tokens for p in parts]).astype(np.int32, copy=False),
                           np.concatenate([p.prompt_lengths for p in parts]).astype(np.int32, copy=False),
                           np.concatenate([p.response_counts for p in parts]).astype(np.int32, copy=False),
                           np.concatenate([p.response_lengths for p in parts]).astype(np.int32, copy=False),
                           [s for p in parts for s in p.sources])


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


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    """One batched tokenizer call; a text that occurs several times is tokenised once."""
    if not texts:
        return []
    index: dict[str, int] = {}
    order = [index.setdefault(t, len(index)) for t in texts]
    options = dict(add_special_tokens=add_special_tokens, return_attention_mask=False, return_token_type_ids=False)
    if len(index) == len(texts):
        return tokenizer(texts, **options)["input_ids"]
    ids = tokenizer(list(index), **options)["input_ids"]
    return [ids[i] for i in order]


def _flatten(lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(flat int64 ids, int64 lengths) of a list of id lists."""
    lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
    flat = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int64, count=int(lengths.sum()))
    return flat, lengths


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Indices of the concatenated ranges [start, start + length)."""
    offsets = np.cumsum(lengths) - lengths
    return np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(offsets - starts, lengths)


def _insert_after(flat: np.ndarray, lengths: np.ndarray, where: np.ndarray,
                  token: int) -> tuple[np.ndarray, np.ndarray]:
    """Append `token` to each segment selected by the boolean mask `where`."""
    ends = np.cumsum(lengths)
    return np.insert(flat, ends[where], token), lengths + where


class _Context:
    """What every chunk needs from the tokenizer, looked up once."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, config: TokenizeConfig):
        self.eos = tokenizer.eos_token_id
        if self.eos is None:
            raise ConfigError("the tokenizer has no EOS token; set tokenizer.eos_token before training")
        self.specials = np.array(sorted(_special_ids(tokenizer)), dtype=np.int64)
        self.bos = tokenizer.bos_token_id
        self.start = _start_token(tokenizer)
        self.tokenizer = tokenizer
        self.config = config
        if config.apply_chat_template and not has_chat_template(tokenizer):
            raise ConfigError("--apply-chat-template needs a tokenizer with a chat template; this one has none")


def _texts(records: Sequence[PreferencePair | Completion], tokenizer,
           wrap_plain: bool = False) -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
    """Prompt texts (and whether each gets special tokens: plain text does, a rendered chat prompt does not),
    the responses' texts in order and the number of responses of each record. `wrap_plain` renders plain-text
    records as a user turn and an assistant turn (the apply_chat_template setting)."""
    prompts, special, responses, counts = [], [], [], []
    for record in records:
        resps = (record.chosen, record.rejected) if isinstance(record, PreferencePair) else (record.completion,)
        prompt: Text = record.prompt
        if wrap_plain and isinstance(prompt, str):
            prompt = user_turn(prompt)
            resps = tuple(assistant_turn(r) if isinstance(r, str) else r for r in resps)
        if isinstance(prompt, list):
            prompt_text, texts = render_chat(tokenizer, prompt, resps, record.source)
            prompts.append(prompt_text)
            special.append(False)
            responses.extend(texts)
        else:
            prompts.append(prompt)
            special.append(True)
            responses.extend(resps)
        counts.append(len(resps))
    return prompts, np.array(special, dtype=bool), responses, np.array(counts, dtype=np.int64)


def _tokenize_chunk(records: Sequence[PreferencePair | Completion], ctx: _Context, report: FilterReport) -> TokenArrays:
    """Tokenise one chunk of records under the module's rules; filtered ones are counted in `report`."""
    config, eos = ctx.config, ctx.eos
    n = len(records)
    prompts, special, responses, counts = _texts(records, ctx.tokenizer, config.apply_chat_template)

    # prompts: plain ones with the tokenizer's special tokens, rendered chat prompts without
    prompt_ids: list = [None] * n
    plain = np.flatnonzero(special).tolist()
    chat = np.flatnonzero(~special).tolist()
    for rows, add in ((plain, True), (chat, False)):
        for i, ids in zip(rows, _encode(ctx.tokenizer, [prompts[i] for i in rows], add)):
            prompt_ids[i] = ids
    p_flat, p_len = _flatten(prompt_ids)
    # a tokenizer that appends EOS to every encoding: a (plain, longer than one token) prompt must not end with it
    p_ends = np.cumsum(p_len)
    last = p_flat[np.maximum(p_ends - 1, 0)] if len(p_flat) else np.full(n, -1)
    strip = special & (p_len > 1) & (last == eos)
    if strip.any():
        keep = np.ones(len(p_flat), dtype=bool)
        keep[p_ends[strip] - 1] = False
        p_flat, p_len = p_flat[keep], p_len - strip
    # an empty prompt is the start token
    p_flat, p_len = _insert_after(p_flat, p_len, p_len == 0, ctx.start)
    p_starts = np.cumsum(p_len) - p_len

    # responses, with EOS appended unless they end with a special token
    r_flat, r_len = _flatten(_encode(ctx.tokenizer, responses, False))
    r_ends = np.cumsum(r_len)
    r_last = r_flat[np.maximum(r_ends - 1, 0)] if len(r_flat) else np.full(len(r_len), -1)
    needs_eos = (r_len == 0) | ~np.isin(r_last, ctx.specials)
    r_flat, r_len = _insert_after(r_flat, r_len, needs_eos, eos)
    r_starts = np.cumsum(r_len) - r_len
    first_response = np.cumsum(counts) - counts

    # identical chosen and rejected (pairs only): same length and same ids
    identical = np.zeros(n, dtype=bool)
    pairs = np.flatnonzero(counts == 2)
    a, b = first_response[pairs], first_response[pairs] + 1
    same_length = r_len[a] == r_len[b]
    cand, a, b = pairs[same_length], a[same_length], b[same_length]
    if len(cand):
        differs = r_flat[_ranges(r_starts[a], r_len[a])] != r_flat[_ranges(r_starts[b], r_len[b])]
        owner = np.repeat(np.arange(len(cand)), r_len[a])
        identical[cand] = np.bincount(owner, weights=differs, minlength=len(cand)) == 0

    # prompt truncation, then filtering of what still does not fit
    longest = np.maximum.reduceat(r_len, first_response)
    truncated = ~identical & (p_len + longest > config.max_length) & (p_len > config.max_prompt_length)
    head = np.zeros(n, dtype=np.int64)  # the kept leading BOS (0 or 1 token) of a truncated prompt
    body_start, body_len = p_starts.copy(), p_len.copy()
    if truncated.any():
        if ctx.bos is not None:
            head[truncated] = p_flat[p_starts[truncated]] == ctx.bos
        room = config.max_prompt_length - head
        rest = p_len - head  # the prompt after its kept BOS
        if config.truncation == "keep_end":
            # body[-room:], as a Python slice: room 0 keeps the whole body
            take = np.where(room > 0, np.minimum(room, rest), rest)
            skip = rest - take
        else:
            take, skip = np.minimum(room, rest), np.zeros(n, dtype=np.int64)
        body_start = np.where(truncated, p_starts + head + skip, p_starts)
        body_len = np.where(truncated, take, p_len)
    new_len = head + body_len
    too_long = ~identical & (new_len + longest > config.max_length)
    report.prompts_truncated += int(truncated.sum())
    too_long_reason = f"longer than max_length={config.max_length} after prompt truncation"
    for i in np.flatnonzero(identical | too_long).tolist():
        report.add("identical chosen and rejected" if identical[i] else too_long_reason, records[i].source)

    # the kept examples' ids, in order: [prompt head, prompt body, responses...] per example
    kept = np.flatnonzero(~identical & ~too_long)
    k_counts = counts[kept]
    resp = _ranges(first_response[kept], k_counts)  # indices of the kept examples' responses
    n_seg = 2 + k_counts
    base = np.cumsum(n_seg) - n_seg
    starts = np.empty(int(n_seg.sum()), dtype=np.int64)
    lengths = np.empty_like(starts)
    starts[base], lengths[base] = p_starts[kept], head[kept]
    starts[base + 1], lengths[base + 1] = body_start[kept], body_len[kept]
    resp_slots = _ranges(base + 2, k_counts)
    starts[resp_slots], lengths[resp_slots] = r_starts[resp] + len(p_flat), r_len[resp]
    tokens = np.concatenate([p_flat, r_flat])[_ranges(starts, lengths)]
    return TokenArrays(tokens.astype(np.int32), new_len[kept].astype(np.int32), k_counts.astype(np.int32),
                       r_len[resp].astype(np.int32), [records[i].source for i in kept.tolist()])


class ChunkTokenizer:
    """Tokenises one chunk of records at a time under the module's rules, for callers that see the records as a
    stream (dpokit.data.streaming): the same chunks give the same arrays as :func:`tokenize_arrays`."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, config: TokenizeConfig):
        self._ctx = _Context(tokenizer, config)

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
    ctx = _Context(tokenizer, config)
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
