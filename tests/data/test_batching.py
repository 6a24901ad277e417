"""Batch layouts: every layout scores the same tokens of the same sequences; masks keep responses apart."""

import pytest
import torch

from dpokit.data.batching import collate, forward_groups, shared_length_weights
from dpokit.errors import ConfigError
from dpokit.data.tokenize import TokenizedExample

EXAMPLES = [
    TokenizedExample((5, 6, 7), ((10, 11), (20, 21, 22))),
    TokenizedExample((8,), ((12,), (23,))),
    TokenizedExample((9, 9, 9, 9, 9, 9), ((13, 14, 15, 16), (25,))),
]


def _scored(batch):
    """(sequence, target token, token fed at the predicting position) for every scored token."""
    fed = batch.input_ids.reshape(-1)[batch.target_index]
    return sorted(zip(batch.target_seq.tolist(), batch.target_ids.tolist(), fed.tolist()))


@pytest.mark.parametrize("layout", ["plain", "shared", "packed"])
def test_every_layout_scores_the_same_tokens(layout):
    batch = collate(EXAMPLES, [0, 1, 2], layout=layout)
    expected = []
    for i, e in enumerate(EXAMPLES):
        for j, response in enumerate(e.responses):
            context = list(e.prompt_ids) + list(response)
            for k, token in enumerate(response):
                expected.append((i * 2 + j, token, context[len(e.prompt_ids) + k - 1]))
    assert _scored(batch) == sorted(expected)
    assert batch.token_counts.tolist() == [2, 3, 1, 1, 4, 1]
    assert batch.num_sequences == 6 and batch.example_ids.tolist() == [0, 1, 2]


def test_shared_layout_hides_responses_from_each_other_and_restarts_positions():
    batch = collate(EXAMPLES[:1], [0], layout="shared")
    mask = batch.attention_mask[0]
    # columns: prompt 0-2, chosen 3-4, rejected 5-7
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5]
    assert mask[5, :3].all() and not mask[5, 3:5].any() and mask[5, 5]
    assert mask[4, :5].all() and not mask[4, 5:].any()
    assert not mask[0, 1:].any()  # causal


def test_packing_never_makes_rows_longer_and_keeps_examples_apart():
    batch = collate(EXAMPLES, [0, 1, 2], layout="packed")
    longest = max(e.length for e in EXAMPLES)
    assert batch.input_ids.shape == (2, longest)  # examples 0 (8 tokens) and 1 (3) share a row of 11
    row = next(r for r in range(2) if (batch.input_ids[r] == 8).any())
    cols_of_1 = (batch.input_ids[row] == 8).nonzero().item()
    cols_of_0 = (batch.input_ids[row] == 5).nonzero().item()
    assert not batch.attention_mask[row, cols_of_1, cols_of_0] and not batch.attention_mask[row, cols_of_0, cols_of_1]
    assert batch.position_ids[row, cols_of_1] == 0


def test_plain_layout_pads_right_with_a_2d_mask():
    batch = collate(EXAMPLES, [0, 1, 2], layout="plain", pad_token_id=99)
    assert batch.attention_mask.dim() == 2 and batch.input_ids.shape[0] == 6
    assert batch.input_ids[3, 2:].eq(99).all() and batch.attention_mask[3].tolist()[:3] == [1, 1, 0]


def test_unknown_layout():
    with pytest.raises(ConfigError, match="layout"):
        collate(EXAMPLES, [0, 1, 2], layout="zigzag")


def test_to_moves_tensors():
    """Every tensor field goes to the device (the "meta" device, so this can fail on a CPU-only machine) with
    its shape and dtype; the other fields are kept; the original batch stays where it was."""
    batch = collate(EXAMPLES, [0, 1, 2])
    moved = batch.to(torch.device("meta"))
    fields = vars(batch)
    assert {k for k, v in fields.items() if isinstance(v, torch.Tensor)} == {
        "input_ids", "position_ids", "attention_mask", "target_index", "target_ids", "target_seq", "token_counts",
        "example_ids", "token_example", "token_segment"}
    for name, value in fields.items():
        other = getattr(moved, name)
        if isinstance(value, torch.Tensor):
            assert other.device.type == "meta", name
            assert (other.shape, other.dtype) == (value.shape, value.dtype), name
            assert value.device.type == "cpu", name
        else:
            assert other == value, name
    assert moved.num_responses == 2 and moved.num_sequences == batch.num_sequences


def test_forward_groups_sort_by_length_and_respect_the_budget():
    # lengths: 8, 3, 11
    assert forward_groups([0, 1, 2], EXAMPLES, 0) == [[0, 1, 2]]
    assert forward_groups([0, 1, 2], EXAMPLES, 11) == [[1, 0], [2]]
    assert forward_groups([0, 1, 2], EXAMPLES, 10) == [[1], [0], [2]]
    assert forward_groups([0, 1, 2], EXAMPLES, 1) == [[1], [0], [2]]  # longer than the budget: alone
    assert forward_groups([2, 0], EXAMPLES, 100) == [[0, 2]]


def test_packing_is_first_fit_decreasing():
    """Lengths 5, 9, 3, 6, 4 in rows of at most 9 tokens: longest first fills three rows with no padding,
    [9], [6, 3], [5, 4]. First fit in increasing order ([3, 4], [5], [6], [9]) or in the given order
    ([5, 3], [9], [6], [4]) needs four rows."""
    lengths = [5, 9, 3, 6, 4]
    examples = []
    for i, n in enumerate(lengths):  # every token of example i is 100 + i; prompt 1, chosen 1, rejected n - 2
        t = 100 + i
        examples.append(TokenizedExample((t,), ((t,), (t,) * (n - 2))))
    assert [e.length for e in examples] == lengths
    batch = collate(examples, range(5), layout="packed", pad_token_id=0)
    rows = [[1], [3, 2], [0, 4]]
    assert batch.input_ids.tolist() == [[100 + i for i in row for _ in range(lengths[i])] for row in rows]
    # each example starts again at position 0; each response continues from its prompt
    assert batch.position_ids[1].tolist() == [0, 1, 1, 2, 3, 4, 0, 1, 1]
    assert batch.token_counts.tolist() == [c for n in lengths for c in (1, n - 2)]


@pytest.mark.parametrize("layout", ["plain", "shared", "packed"])
def test_shared_length_weights_mark_the_tokens_beyond_the_shorter_response(layout):
    """LD-DPO: the first min(len(chosen), len(rejected)) tokens of each response weigh 1, the rest alpha."""
    batch = collate(EXAMPLES, [0, 1, 2], layout=layout)
    weights = shared_length_weights(batch, 0.25)
    got = dict(zip(zip(batch.target_seq.tolist(), batch.target_ids.tolist()), weights.tolist()))
    expected = {}
    for i, e in enumerate(EXAMPLES):
        shared = min(len(r) for r in e.responses)
        for j, response in enumerate(e.responses):
            for k, token in enumerate(response):
                expected[(i * 2 + j, token)] = 1.0 if k < shared else 0.25
    assert got == expected
    assert sorted(expected.values()).count(0.25) == 4  # (20, 21, 22) -> 22; (13, 14, 15, 16) -> 14, 15, 16


def test_sequence_logprobs_apply_the_target_weights():
    from dataclasses import replace

    from dpokit.models.logprobs import sequence_logprobs, token_logprobs
    from helpers import make_llama

    model = make_llama(vocab_size=32).eval()
    batch = collate(EXAMPLES, [0, 1, 2])
    weights = shared_length_weights(batch, 0.5)
    with torch.no_grad():
        tokens = token_logprobs(model, batch)
        weighted = sequence_logprobs(model, replace(batch, target_weights=weights))
    expected = torch.zeros(6).index_add(0, batch.target_seq, tokens * weights)
    torch.testing.assert_close(weighted, expected)
    with torch.no_grad():
        assert not torch.allclose(weighted, sequence_logprobs(model, batch))
