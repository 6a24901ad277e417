"""Tests for dpokit.losses.objective: the KTO objective's mismatched KL pairs of a micro-batch, and the loss and metric
sums it returns, against log-probs scored one sequence at a time and dpokit.losses.dispatch.unpaired_loss; the DPO
objective's average_logps against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from dpokit.data.batching import collate
from dpokit.train.engine import Scorer
from dpokit.losses.dispatch import LossConfig, unpaired_loss
from dpokit.losses.objective import DPOObjective, KTOObjective, kl_pairs
from dpokit.train.reference import ModelReference
from dpokit.data.tokenize import TokenizedExample
from dpokit.train.loop import micro_batches
from helpers import make_llama

pytestmark = pytest.mark.usefixtures("single_thread")

EXAMPLES = [TokenizedExample((5, 6), ((7, 8, 0),), "a"), TokenizedExample((9,), ((10, 0),), "b"),
            TokenizedExample((11, 12, 13), ((14, 15, 16, 0),), "c"), TokenizedExample((17,), ((18, 0),), "d")]


def test_kl_pairs_give_each_prompt_the_previous_completion():
    """(x_1, y_4), (x_2, y_1), (x_3, y_2), (x_4, y_3): TRL's rotation by one within the batch."""
    paired = kl_pairs(EXAMPLES)
    assert [e.prompt_ids for e in paired] == [e.prompt_ids for e in EXAMPLES]
    assert [e.responses[0] for e in paired] == [e.responses[0] for e in EXAMPLES]
    assert [e.responses[1] for e in paired] == [EXAMPLES[i - 1].responses[0] for i in range(4)]
    assert [e.source for e in paired] == ["a", "b", "c", "d"]


@pytest.mark.parametrize("layout", ["plain", "packed"])
def test_kto_objective_sums_match_sequence_by_sequence_scoring(layout):
    """The micro-batch is kept whole and paired (even with a 1-token forward budget), and the objective's sums are
    unpaired_loss of the matched and mismatched sequences' log-probs, each scored on its own."""
    policy, reference = Scorer(make_llama()), ModelReference(make_llama(seed=1))
    labels = torch.tensor([False, True, True, False, True])  # example ids 1..4 are used: True, True, False, True
    ids = [1, 2, 3, 4]
    examples = [None, *EXAMPLES]
    config = LossConfig("kto", 0.5, desirable_weight=1.5, undesirable_weight=0.7)
    objective = KTOObjective(config, reference, labels)
    batches = micro_batches(objective, examples, ids, layout, 0, max_tokens=1)
    assert len(batches) == 1 and batches[0].num_sequences == 8
    with torch.no_grad():
        result = objective(policy, batches[0])

    def scored(model, prompt, response):
        return model(collate([TokenizedExample(prompt, (response,))], [0], layout="plain"))[0]

    with torch.no_grad():
        pairs = [(e.prompt_ids, e.responses[0]) for e in EXAMPLES]
        kl = [(e.prompt_ids, EXAMPLES[i - 1].responses[0]) for i, e in enumerate(EXAMPLES)]
        logps = [torch.stack([scored(m, *p) for p in seqs]) for m in (policy, reference.model) for seqs in (pairs, kl)]
    desirable = labels[ids]
    policy_logps, policy_kl, reference_logps, reference_kl = logps
    out = unpaired_loss(policy_logps, reference_logps, policy_kl, reference_kl, desirable, config)
    assert result.metric_sums["kl"].item() == pytest.approx(4 * out.kl.item(), abs=1e-5)
    assert out.kl.item() > 0  # not the clamped value: the check of the KL pairs means something
    assert result.loss_sum.item() == pytest.approx(out.losses.sum().item(), abs=1e-5)
    assert result.metric_sums["rewards/chosen"].item() == pytest.approx(out.rewards[desirable].sum().item(), abs=1e-5)
    assert result.metric_sums["rewards/rejected"].item() == pytest.approx(out.rewards[~desirable].sum().item(),
                                                                          abs=1e-5)
    assert result.metric_counts["rewards/chosen"].item() == 3 and result.metric_counts["rewards/rejected"].item() == 1
    assert objective.divisor(batches[0]) == 4


# Two pairs whose responses have 4, 2 and 3, 5 scored tokens (the EOS included), and summed log-probs chosen so
# that the per-token means are round: policy -2, -1.5 | -2, -2.5 per token; reference -2.5, -1 | -1, -2.
AVERAGED_PAIRS = [TokenizedExample((5, 6), ((7, 8, 9, 0), (10, 0)), "a"),
                  TokenizedExample((11,), ((12, 13, 0), (14, 15, 16, 17, 0)), "b")]
POLICY_SUMS = [-8.0, -3.0, -6.0, -12.5]
REFERENCE_SUMS = [-10.0, -2.0, -3.0, -10.0]


@pytest.mark.parametrize("loss_type, loss_sum", [
    # margins h (per-token policy-reference ratios, chosen minus rejected): 1.0 and -0.5; sft term 0.3 * 2 per pair
    ("ipo", (1.0 - 1.0) ** 2 + (-0.5 - 1.0) ** 2 + 2 * 0.3 * 2.0),  # (h - 1/(2 beta))^2, beta 0.5
    ("sigmoid", math.log1p(math.exp(-0.5)) + math.log1p(math.exp(0.25)) + 2 * 0.3 * 2.0),  # -logsigmoid(beta h)
])
def test_average_logps_divides_each_sequence_by_its_tokens_once(loss_type, loss_sum):
    """With average_logps the objective scores per-token mean log-probs: the loss, the SFT term and the logged
    rewards and log-probs are those of the means, and ipo and the SFT term do not divide by the counts again."""
    batch = collate(AVERAGED_PAIRS, [0, 1], layout="plain")
    assert batch.token_counts.tolist() == [4, 2, 3, 5]
    objective = DPOObjective(LossConfig(loss_type, 0.5, sft_weight=0.3),
                             lambda batch, policy: torch.tensor(REFERENCE_SUMS), average_logps=True)
    result = objective(lambda batch: torch.tensor(POLICY_SUMS), batch)
    assert result.loss_sum.item() == pytest.approx(loss_sum, abs=1e-6)
    sums = {k: v.item() for k, v in result.metric_sums.items()}
    # rewards: beta * per-token ratio; chosen ratios 0.5, -1; rejected -0.5, -0.5
    assert sums["rewards/chosen"] == pytest.approx(0.5 * (0.5 - 1.0))
    assert sums["rewards/rejected"] == pytest.approx(0.5 * (-0.5 - 0.5))
    assert sums["rewards/margins"] == pytest.approx(0.5 * (1.0 - 0.5))
    assert sums["logps/chosen"] == pytest.approx(-2.0 - 2.0) and sums["logps/rejected"] == pytest.approx(-1.5 - 2.5)
