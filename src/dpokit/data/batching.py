"""Tokenised examples -> tensors, in one of three layouts that give the same log-probs.

* ``plain``: every (prompt + response) is its own row, right-padded: what the peers do. The prompt is
  computed once per response.
* ``shared``: one row per example, ``prompt, response 1, response 2, ...``; each response attends to the
  prompt and to itself only (a block mask) and restarts its positions where the prompt ends, so the prompt
  is computed once.
* ``packed``: the shared rows of several examples placed side by side in one row (first-fit decreasing, no
  row longer than the batch's longest example), each example masked from the others: less padding, and no
  row longer than in ``shared``, so attention does not grow.

Whatever the layout, a Batch says which hidden states predict which target tokens of which sequence
(``target_index``, ``target_ids``, ``target_seq``), so log-prob code never needs to know the layout.
Sequence ``s = example * num_responses + response``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dpokit.errors import ConfigError
from dpokit.data.tokenize import TokenizedExample
from dpokit.data.vision import has_vision, stack_vision

LAYOUTS = ("plain", "shared", "packed")


@dataclass
class Batch:
    """Model inputs plus the map from hidden states to scored tokens.

    ``attention_mask`` is 2-D ``[rows, length]`` (1 = token) in the plain layout, and a boolean
    ``[rows, length, length]`` (True = may attend) in the others.
    """

    input_ids: Tensor
    position_ids: Tensor
    attention_mask: Tensor
    target_index: Tensor  # [T] flat index (row * length + column) of the hidden state predicting each target
    target_ids: Tensor  # [T]
    target_seq: Tensor  # [T] sequence each target belongs to
    token_counts: Tensor  # [num_sequences] scored tokens per sequence
    example_ids: Tensor  # [num_examples] positions of the examples in their data set
    num_responses: int
    # [T] weight of each target's log-prob in its sequence's sum (None: 1 each); see shared_length_weights
    target_weights: Tensor | None = None
    # shared/packed layouts: [rows, length] example of each column (-1: padding) and its segment (0: prompt,
    # j + 1: response j), from which dpokit.models.attention builds a FlexAttention block mask; None in the plain layout
    token_example: Tensor | None = None
    token_segment: Tensor | None = None
    # the same as spans, per row: (prompt start, prompt length, ((response start, length), ...)) per example
    spans: list[list[tuple[int, int, tuple[tuple[int, int], ...]]]] | None = None
    # a vision-language model's image inputs (pixel_values, image_grid_thw, per-token type ids: dpokit.data.vision),
    # given to the model with the token ids; None for text
    vision: dict | None = None

    @property
    def num_sequences(self) -> int:
        """Number of scored sequences: examples x responses."""
        return self.token_counts.numel()

    def to(self, device: torch.device | str) -> "Batch":
        """The same batch on `device`."""
        moved = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in vars(self).items()}
        if self.vision is not None:
            moved["vision"] = {k: v.to(device) for k, v in self.vision.items()}
        return Batch(**moved)


def _targets(prompt_len: int, starts: Sequence[int], lengths: Sequence[int], row: int, width: int, offset: int):
    """Predictor columns and target columns for responses placed after a prompt starting at `offset`."""
    predictors, targets = [], []
    for start, length in zip(starts, lengths):
        cols = list(range(start, start + length))
        targets.extend(cols)
        predictors.extend([offset + prompt_len - 1] + cols[:-1])
    return [row * width + c for c in predictors], targets


def collate(
    examples: Sequence[TokenizedExample],
    example_ids: Sequence[int],
    *,
    layout: str = "packed",
    pad_token_id: int = 0,
) -> Batch:
    """Build a Batch of `examples` (all with the same number of responses) in `layout`. Examples with images
    (dpokit.data.vision) give the batch their image inputs: once per response in the plain layout, once per example
    in the others, in the order their prompts appear in the rows."""
    if layout not in LAYOUTS:
        raise ConfigError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    num_responses = len(examples[0].responses)
    if layout == "plain":
        batch = _collate_plain(examples, example_ids, num_responses, pad_token_id)
        placements = [(e, row, 0) for row, e in enumerate(e for e in examples for _ in e.responses)]
    else:
        rows = [[i] for i in range(len(examples))] if layout == "shared" else _pack(examples)
        batch = _collate_shared(examples, example_ids, rows, num_responses, pad_token_id)
        # each example's prompt once, where its row puts it (spans[r][k][0]: the column of row r's k-th prompt)
        placements = [(examples[i], r, batch.spans[r][k][0]) for r, row in enumerate(rows) for k, i in enumerate(row)]
    if has_vision(examples):
        batch.vision = stack_vision(placements, *batch.input_ids.shape)
    return batch


def _pack(examples: Sequence[TokenizedExample]) -> list[list[int]]:
    """First-fit decreasing into rows no longer than the longest example."""
    capacity = max(e.length for e in examples)
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(examples)), key=lambda i: -examples[i].length):
        for r, free in enumerate(room):
            if examples[i].length <= free:
                rows[r].append(i)
                room[r] -= examples[i].length
                break
        else:
            rows.append([i])
            room.append(capacity - examples[i].length)
    return rows


def _collate_plain(examples, example_ids, num_responses, pad) -> Batch:
    seqs = [(e.prompt_ids, r) for e in examples for r in e.responses]
    width = max(len(p) + len(r) for p, r in seqs)
    input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    index, ids, seq_of = [], [], []
    for s, (prompt, response) in enumerate(seqs):
        tokens = list(prompt) + list(response)
        input_ids[s, : len(tokens)] = torch.tensor(tokens)
        attention[s, : len(tokens)] = 1
        predictors, targets = _targets(len(prompt), [len(prompt)], [len(response)], s, width, 0)
        index.extend(predictors)
        ids.extend(tokens[c] for c in targets)
        seq_of.extend([s] * len(response))
    positions = torch.arange(width).expand(len(seqs), width).clone()
    return _finish(input_ids, positions, attention, index, ids, seq_of, examples, example_ids, num_responses)


def _collate_shared(examples, example_ids, rows, num_responses, pad) -> Batch:
    width = max(sum(examples[i].length for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    group = torch.full((len(rows), width), -1, dtype=torch.long)  # which example a column belongs to
    segment = torch.full((len(rows), width), -1, dtype=torch.long)  # 0 = prompt, j + 1 = response j
    index, ids, seq_of = [], [], []
    spans: list[list[tuple[int, int, tuple[tuple[int, int], ...]]]] = []
    for r, row in enumerate(rows):
        col = 0
        spans.append([])
        for i in row:
            e = examples[i]
            p = len(e.prompt_ids)
            starts = col + p + torch.tensor([0] + [len(resp) for resp in e.responses]).cumsum(0)[:-1]
            spans[r].append((col, p, tuple((int(s), len(resp)) for s, resp in zip(starts, e.responses))))
            tokens = list(e.prompt_ids) + [t for resp in e.responses for t in resp]
            input_ids[r, col : col + len(tokens)] = torch.tensor(tokens)
            group[r, col : col + len(tokens)] = i
            segment[r, col : col + p] = 0
            positions[r, col : col + p] = torch.arange(p)
            start = col + p
            for j, resp in enumerate(e.responses):
                segment[r, start : start + len(resp)] = j + 1
                positions[r, start : start + len(resp)] = torch.arange(p, p + len(resp))
                predictors, targets = _targets(p, [start], [len(resp)], r, width, col)
                index.extend(predictors)
                ids.extend(input_ids[r, targets].tolist())
                seq_of.extend([i * num_responses + j] * len(resp))
                start += len(resp)
            col += len(tokens)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same_example = group[:, :, None] == group[:, None, :]
    visible_segment = (segment[:, None, :] == 0) | (segment[:, None, :] == segment[:, :, None])
    mask = causal & same_example & visible_segment
    batch = _finish(input_ids, positions, mask, index, ids, seq_of, examples, example_ids, num_responses)
    batch.token_example, batch.token_segment, batch.spans = group, segment, spans
    return batch


def _finish(input_ids, positions, mask, index, ids, seq_of, examples, example_ids, num_responses) -> Batch:
    order = sorted(range(len(seq_of)), key=lambda k: seq_of[k])  # group targets by sequence, stable
    seq = torch.tensor([seq_of[k] for k in order], dtype=torch.long)
    counts = torch.tensor([len(r) for e in examples for r in e.responses], dtype=torch.long)
    return Batch(
        input_ids=input_ids,
        position_ids=positions,
        attention_mask=mask,
        target_index=torch.tensor([index[k] for k in order], dtype=torch.long),
        target_ids=torch.tensor([ids[k] for k in order], dtype=torch.long),
        target_seq=seq,
        token_counts=counts,
        example_ids=torch.tensor(list(example_ids), dtype=torch.long),
        num_responses=num_responses,
    )


def shared_length_weights(batch: Batch, alpha: float) -> Tensor:
    """LD-DPO's token weights (Liu et al. 2024, length desensitisation; TRL's ``ld_alpha``): 1 for the first
    ``min(len(chosen), len(rejected))`` tokens of each response of a pair, ``alpha`` for the tokens beyond.

    Relies on the order _finish gives the targets: grouped by sequence, each sequence's tokens in order, and the
    two responses of example i are sequences 2i and 2i + 1.
    """
    if batch.num_responses != 2:
        raise ValueError("shared_length_weights needs pairs (num_responses == 2)")
    counts = batch.token_counts
    starts = counts.cumsum(0) - counts
    position = torch.arange(batch.target_seq.numel(), device=counts.device) - starts[batch.target_seq]
    shared = counts.view(-1, 2).min(dim=1).values.repeat_interleave(2)
    one = torch.ones((), dtype=torch.float32, device=counts.device)
    return torch.where(position < shared[batch.target_seq], one, one * alpha)


def forward_groups(ids: Sequence[int], examples: Sequence[TokenizedExample], max_tokens: int) -> list[list[int]]:
    """Split a micro-batch into groups of at most `max_tokens` tokens (shared-layout count), shortest first.

    The groups are run one after another and their gradients add up to the micro-batch's, so the split changes
    no number; it changes speed. On CPUs a forward pass over ~1k tokens keeps its activations in cache and runs
    faster per token than one over the whole micro-batch (bench/README.md); sorting also trims padding. An
    example longer than the budget forms a group of its own. `max_tokens` 0 keeps the micro-batch whole.
    """
    if max_tokens <= 0:
        return [list(ids)]
    groups: list[list[int]] = []
    tokens = 0
    for i in sorted(ids, key=lambda i: examples[i].length):
        if groups and tokens + examples[i].length <= max_tokens:
            groups[-1].append(i)
            tokens += examples[i].length
        else:
            groups.append([i])
            tokens = examples[i].length
    return groups
