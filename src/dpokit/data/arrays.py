"""How a chunk of records becomes token ids, fast: the part of dpokit.data.tokenize that is only speed and memory.

The rules (boundary, EOS, chat, truncation, filtering) are stated and pinned down in dpokit.data.tokenize; this
module carries them out on a chunk at a time: one batched call of the fast tokenizer per kind of text (plain
prompts, chat prompts, responses; a text repeated inside a chunk, such as the prompt of a ranked row's pairs, is
tokenised once), then EOS appending, prompt truncation and filtering as numpy operations on the chunk's flat token
array. The kept examples come out as a :class:`TokenArrays` (flat token ids + lengths: what the on-disk cache of
dpokit.data.cache stores).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from transformers import PreTrainedTokenizerBase

from dpokit.data.chat import _special_ids, _start_token, assistant_turn, has_chat_template, render_chat, user_turn
from dpokit.data.records import Completion, PreferencePair, Text
from dpokit.errors import ConfigError, DataError


class ChunkSettings(Protocol):
    """The settings the chunk tokeniser reads (those of a dpokit.data.tokenize.TokenizeConfig)."""

    max_length: int
    max_prompt_length: int
    truncation: str
    apply_chat_template: bool
    on_long_rows: str


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


@dataclass
class Chunk:
    """One chunk's kept examples, what it filtered as (reason, source) in record order, how many of its prompts
    were truncated, and which records had a text too long for any use cut before tokenising."""

    arrays: TokenArrays
    filtered: list[tuple[str, str]]
    prompts_truncated: int
    cut: list[str]  # the sources of the records with a text cut to ChunkContext.text_bound before tokenising


class ChunkContext:
    """What every chunk needs from the tokenizer, looked up once."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, config: ChunkSettings):
        self.eos = tokenizer.eos_token_id
        if self.eos is None:
            raise ConfigError("the tokenizer has no EOS token; set tokenizer.eos_token before training")
        self.specials = np.array(sorted(_special_ids(tokenizer)), dtype=np.int64)
        self.bos = tokenizer.bos_token_id
        self.start = _start_token(tokenizer)
        self.tokenizer = tokenizer
        self.config = config
        self.text_bound = text_bound(tokenizer, config.max_length)
        if config.apply_chat_template and not has_chat_template(tokenizer):
            raise ConfigError("--apply-chat-template needs a tokenizer with a chat template; this one has none")


def text_bound(tokenizer: PreTrainedTokenizerBase, tokens: int) -> int:
    """A number of characters that no text of at most `tokens` tokens reaches: each token spans at most as many
    characters as the tokenizer's longest token, so a longer text has more tokens; twice that keeps a cut far
    from the tokens that truncation keeps."""
    longest = max(map(len, itertools.chain(tokenizer.get_vocab(), tokenizer.all_special_tokens)), default=1)
    return 2 * (tokens + 16) * max(longest, 1)


def tokenize_chunk(records: Sequence[PreferencePair | Completion], ctx: ChunkContext) -> Chunk:
    """Tokenise one chunk of records under dpokit.data.tokenize's rules."""
    config = ctx.config
    n = len(records)
    prompts, special, responses, counts = _texts(records, ctx.tokenizer, config.apply_chat_template)
    cut = _cut_long_texts(records, prompts, responses, counts, ctx)
    p_flat, p_len = _prompt_tokens(prompts, special, ctx)
    p_starts = np.cumsum(p_len) - p_len
    r_flat, r_len = _response_tokens(responses, ctx)
    r_starts = np.cumsum(r_len) - r_len
    first_response = np.cumsum(counts) - counts
    identical = _identical_pairs(counts, first_response, r_flat, r_starts, r_len)

    # prompt truncation, then filtering of what still does not fit
    longest = np.maximum.reduceat(r_len, first_response)
    truncated = ~identical & (p_len + longest > config.max_length) & (p_len > config.max_prompt_length)
    head = np.zeros(n, dtype=np.int64)  # the kept leading BOS (0 or 1 token) of a truncated prompt
    body_start, body_len = p_starts.copy(), p_len.copy()
    if truncated.any():
        if ctx.bos is not None:
            head[truncated] = p_flat[p_starts[truncated]] == ctx.bos
        body_start, body_len = _truncated_bodies(truncated, head, p_starts, p_len, config)
    new_len = head + body_len
    too_long = ~identical & (new_len + longest > config.max_length)
    too_long_reason = f"longer than max_length={config.max_length} after prompt truncation"
    filtered = [("identical chosen and rejected" if identical[i] else too_long_reason, records[i].source)
                for i in np.flatnonzero(identical | too_long).tolist()]

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
    arrays = TokenArrays(tokens.astype(np.int32), new_len[kept].astype(np.int32), k_counts.astype(np.int32),
                         r_len[resp].astype(np.int32), [records[i].source for i in kept.tolist()])
    return Chunk(arrays, filtered, int(truncated.sum()), cut)


def _texts(records: Sequence[PreferencePair | Completion], tokenizer,
           wrap_plain: bool = False) -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
    """Prompt texts (and whether each gets special tokens: plain text does, a rendered chat prompt does not),
    the responses' texts in order and the number of responses of each record. `wrap_plain` renders plain-text
    records as a user turn and an assistant turn (the apply_chat_template setting). A record's tools go to the
    chat template with its conversation."""
    prompts, special, responses, counts = [], [], [], []
    for record in records:
        resps = (record.chosen, record.rejected) if isinstance(record, PreferencePair) else (record.completion,)
        prompt: Text = record.prompt
        if wrap_plain and isinstance(prompt, str):
            prompt = user_turn(prompt)
            resps = tuple(assistant_turn(r) if isinstance(r, str) else r for r in resps)
        if record.tools and not isinstance(prompt, list):
            raise DataError(f"{record.source}: field 'tools' needs a conversational prompt (a list of messages), "
                            "or --apply-chat-template: the chat template renders the tools")
        if isinstance(prompt, list):
            prompt_text, texts = render_chat(tokenizer, prompt, resps, record.source, record.tools)
            prompts.append(prompt_text)
            special.append(False)
            responses.extend(texts)
        else:
            prompts.append(prompt)
            special.append(True)
            responses.extend(resps)
        counts.append(len(resps))
    return prompts, np.array(special, dtype=bool), responses, np.array(counts, dtype=np.int64)


def _cut_long_texts(records: Sequence[PreferencePair | Completion], prompts: list[str], responses: list[str],
                    counts: np.ndarray, ctx: ChunkContext) -> list[str]:
    """Cut, in place, every text longer than ``ctx.text_bound`` characters to that bound before it is tokenised
    (a prompt keeps the end truncation keeps; a response its start, and stays too long to fit), so that one huge
    row cannot take the tokenizer's memory; returns the sources of the records cut. With
    ``on_long_rows="error"`` such a row is a DataError naming it instead."""
    bound, cut = ctx.text_bound, []
    keep_end = ctx.config.truncation == "keep_end"
    first = 0
    for i, record in enumerate(records):
        n = int(counts[i])
        long_prompt = len(prompts[i]) > bound
        long_responses = [j for j in range(first, first + n) if len(responses[j]) > bound]
        if long_prompt or long_responses:
            if ctx.config.on_long_rows == "error":
                size = max([len(prompts[i])] + [len(responses[j]) for j in long_responses])
                raise DataError(f"{record.source}: a text of {size:,} characters, more than --max-length "
                                f"{ctx.config.max_length} tokens could ever use ({bound:,}); shorten the row, "
                                "or --on-long-rows cut")
            if long_prompt:
                prompts[i] = prompts[i][-bound:] if keep_end else prompts[i][:bound]
            for j in long_responses:
                responses[j] = responses[j][:bound]
            cut.append(record.source)
        first += n
    return cut


def _prompt_tokens(prompts: list[str], special: np.ndarray, ctx: ChunkContext) -> tuple[np.ndarray, np.ndarray]:
    """(flat ids, lengths) of the prompts: plain ones with the tokenizer's special tokens, rendered chat prompts
    without; an empty prompt becomes the start token."""
    prompt_ids: list = [None] * len(prompts)
    plain = np.flatnonzero(special).tolist()
    chat = np.flatnonzero(~special).tolist()
    for rows, add in ((plain, True), (chat, False)):
        for i, ids in zip(rows, _encode(ctx.tokenizer, [prompts[i] for i in rows], add)):
            prompt_ids[i] = ids
    p_flat, p_len = _flatten(prompt_ids)
    # a tokenizer that appends EOS to every encoding: a (plain, longer than one token) prompt must not end with it
    p_ends = np.cumsum(p_len)
    last = p_flat[np.maximum(p_ends - 1, 0)] if len(p_flat) else np.full(len(prompts), -1)
    strip = special & (p_len > 1) & (last == ctx.eos)
    if strip.any():
        keep = np.ones(len(p_flat), dtype=bool)
        keep[p_ends[strip] - 1] = False
        p_flat, p_len = p_flat[keep], p_len - strip
    return _insert_after(p_flat, p_len, p_len == 0, ctx.start)


def _response_tokens(responses: list[str], ctx: ChunkContext) -> tuple[np.ndarray, np.ndarray]:
    """(flat ids, lengths) of the responses, each with EOS appended unless it ends with a special token."""
    r_flat, r_len = _flatten(_encode(ctx.tokenizer, responses, False))
    r_ends = np.cumsum(r_len)
    r_last = r_flat[np.maximum(r_ends - 1, 0)] if len(r_flat) else np.full(len(r_len), -1)
    needs_eos = (r_len == 0) | ~np.isin(r_last, ctx.specials)
    return _insert_after(r_flat, r_len, needs_eos, ctx.eos)


def _identical_pairs(counts: np.ndarray, first_response: np.ndarray, r_flat: np.ndarray, r_starts: np.ndarray,
                     r_len: np.ndarray) -> np.ndarray:
    """Per record, whether it is a pair whose chosen and rejected have the same ids (so the same length)."""
    identical = np.zeros(len(counts), dtype=bool)
    pairs = np.flatnonzero(counts == 2)
    a, b = first_response[pairs], first_response[pairs] + 1
    same_length = r_len[a] == r_len[b]
    cand, a, b = pairs[same_length], a[same_length], b[same_length]
    if len(cand):
        differs = r_flat[_ranges(r_starts[a], r_len[a])] != r_flat[_ranges(r_starts[b], r_len[b])]
        owner = np.repeat(np.arange(len(cand)), r_len[a])
        identical[cand] = np.bincount(owner, weights=differs, minlength=len(cand)) == 0
    return identical


def _truncated_bodies(truncated: np.ndarray, head: np.ndarray, p_starts: np.ndarray, p_len: np.ndarray,
                      config: ChunkSettings) -> tuple[np.ndarray, np.ndarray]:
    """(start, length) in the flat prompt ids of each prompt's body (the prompt after its kept leading BOS,
    `head`): cut to fit max_prompt_length from its end or its start where `truncated`, whole elsewhere."""
    room = config.max_prompt_length - head
    rest = p_len - head
    if config.truncation == "keep_end":
        # body[-room:], as a Python slice: room 0 keeps the whole body
        take = np.where(room > 0, np.minimum(room, rest), rest)
        skip = rest - take
    else:
        take, skip = np.minimum(room, rest), np.zeros(len(p_len), dtype=np.int64)
    return np.where(truncated, p_starts + head + skip, p_starts), np.where(truncated, take, p_len)


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
