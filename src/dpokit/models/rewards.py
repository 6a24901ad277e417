"""Model + Batch -> the reward of every sequence: a reward model (``AutoModelForSequenceClassification`` with one
output) read at each prompt + response sequence's last token that is not padding, as the classifier's own
forward pools it.

The classifier's forward pools the last position of a row whose token is not ``config.pad_token_id`` (where the
pad token is EOS, the token before the EOS dpokit appends to a response; a sequence that is all padding is read at
its first token). Here the decoder runs on any of dpokit's layouts (plain, shared, packed: dpokit.data.batching)
and the score head reads the same position of each sequence, so the rewards are the classifier's own on the plain
layout and, where the model honours the block masks (dpokit.models.logprobs.check_layout), on the others: a
prompt computed once for both responses of a pair.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dpokit.data.batching import Batch
from dpokit.models.last_layer import last_layer_only_at
from dpokit.models.logprobs import _model_inputs


def is_reward_model(model: nn.Module) -> bool:
    """Whether `model` (or the base model of a PEFT model) is a sequence classifier: a reward model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(base).__name__.endswith("ForSequenceClassification")


def _last(values: Tensor, groups: Tensor, size: int, reduce: str = "amax") -> Tensor:
    """Per group of `groups` (0..size-1), the max (or min) of `values`; -1 where a group has none (amax)."""
    fill = -1 if reduce == "amax" else torch.iinfo(torch.long).max
    out = torch.full((size,), fill, dtype=torch.long, device=values.device)
    return out.scatter_reduce(0, groups, values, reduce=reduce, include_self=True)


def pooled_positions(batch: Batch, pad_token_id: int | None) -> Tensor:
    """The flat position (``row * length + column``) of each sequence's last token that is not `pad_token_id`
    (its first token when every one is), ``[batch.num_sequences]``: where a sequence classifier reads it."""
    ids = batch.input_ids.reshape(-1)
    flat = torch.arange(ids.numel(), device=ids.device)
    real = ids != pad_token_id if pad_token_id is not None else torch.ones_like(ids, dtype=torch.bool)
    n = batch.num_sequences
    if batch.token_example is None:  # plain: row s is sequence s, right-padded
        length = batch.input_ids.shape[1]
        row = flat // length
        token = batch.attention_mask.reshape(-1).bool()
        last = _last(torch.where(token & real, flat, -1), row, n)
        return torch.where(last >= 0, last, torch.arange(n, device=ids.device) * length)
    example, segment = batch.token_example.reshape(-1), batch.token_segment.reshape(-1)
    responses = batch.num_responses
    examples = n // responses
    in_response = segment >= 1
    sequence = torch.where(in_response, example * responses + segment - 1, 0)
    last = _last(torch.where(in_response & real, flat, -1), sequence, n)
    in_prompt = segment == 0
    prompt_last = _last(torch.where(in_prompt & real, flat, -1), torch.where(in_prompt, example, 0), examples)
    first = _last(torch.where(example >= 0, flat, torch.iinfo(torch.long).max), example.clamp_min(0), examples,
                  reduce="amin")
    owner = torch.arange(n, device=ids.device) // responses
    return torch.where(last >= 0, last, torch.where(prompt_last[owner] >= 0, prompt_last[owner], first[owner]))


def score_head(model: nn.Module) -> nn.Module:
    """The one-output head of a sequence classifier (``score``; a PEFT model's trained copy of it)."""
    head = getattr(model, "score", None)
    if head is None:
        raise TypeError(f"{type(model).__name__} has no score head: not a decoder sequence classifier")
    return head


def sequence_rewards(model: nn.Module, batch: Batch) -> Tensor:
    """The reward of every sequence of `batch`, float32, ``[batch.num_sequences]``: the score head at the position
    :func:`pooled_positions` gives (the pad token is ``model.config.pad_token_id``). The decoder's last layer does
    its per-token work there only (dpokit.models.last_layer)."""
    positions = pooled_positions(batch, model.config.pad_token_id)
    rows, length = batch.input_ids.shape
    with last_layer_only_at(model, rows, length, positions):
        hidden = model.get_decoder()(**_model_inputs(batch, model))[0]
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
    return score_head(model)(hidden).float()[:, 0]
