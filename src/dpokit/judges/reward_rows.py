"""A reward model (a one-output sequence classifier) over token rows, texts tokenised as dpokit tokenises a
response for training: the text as a prompt is (dpokit.data.chat.prompt_token_ids), then EOS. Rows are right-padded,
whatever the tokenizer's padding side, and the classifier pools the last token that is not padding.

dpokit.experiments.paper.reward_model trains reward models on such rows, and ``dpokit.judges.pointwise.reward_judge(...,
append_eos=True)`` scores texts the same way."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def padded_rows(rows: Sequence[Sequence[int]], pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded input ids and attention mask of token rows."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def score_rows(model, rows: Sequence[Sequence[int]], pad_token_id: int) -> Tensor:
    """r for each row of token ids: the classifier's scalar at the last non-pad token, float32, ``[rows]``."""
    device = next(model.parameters()).device
    ids, mask = padded_rows(rows, pad_token_id)
    return model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, 0].float()


def text_ids(tokenizer, text: str, max_tokens: int | None = None) -> list[int]:
    """A full text's ids as the reward model was trained on them: the text tokenised as a prompt is
    (:func:`dpokit.data.chat.prompt_token_ids`), then EOS; the last `max_tokens` of them when it is longer."""
    from dpokit.data.chat import prompt_token_ids

    ids = prompt_token_ids(tokenizer, text) + [tokenizer.eos_token_id]
    return ids[-max_tokens:] if max_tokens else ids


@torch.no_grad()
def text_scores(model, tokenizer, texts: Sequence[str], batch_size: int, max_tokens: int | None) -> list[float]:
    """r(text) of each text (:func:`text_ids`, at most `max_tokens` each), `batch_size` texts at a time."""
    scores: list[float] = []
    for start in range(0, len(texts), batch_size):
        rows = [text_ids(tokenizer, t, max_tokens) for t in texts[start : start + batch_size]]
        scores += score_rows(model, rows, tokenizer.pad_token_id).tolist()
    return scores
