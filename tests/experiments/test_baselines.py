"""The paper's baselines (dpokit.experiments.paper.baselines): the Unlikelihood objective's value and effect, Preferred-FT's
checkpoints, on the tiny test model."""

import json

import pytest
import torch

from dpokit.data.batching import collate
from dpokit.train.engine import Scorer
from dpokit.models.logprobs import sequence_logprobs
from dpokit.losses.objective import UnlikelihoodObjective
from dpokit.data.tokenize import TokenizedExample

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: extra threads only contend (conftest.py)


def _pair_batch(tokenizer):
    examples = [TokenizedExample((5, 6, 7), ((8, 9), (10, 11, 12))), TokenizedExample((5,), ((13,), (14, 15)))]
    return collate(examples, range(len(examples)), layout="packed", pad_token_id=tokenizer.pad_token_id)


def test_unlikelihood_objective_is_the_hand_formula_over_the_pairs_tokens(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    batch = _pair_batch(tokenizer)
    with torch.no_grad():
        result = UnlikelihoodObjective(alpha=0.5)(Scorer(model), batch)
        # each response alone, scored by its sequence log-prob: chosen NLL, rejected -log(1 - p) token by token
        examples = [TokenizedExample((5, 6, 7), ((8, 9),)), TokenizedExample((5,), ((13,),))]
        chosen_nll = -sequence_logprobs(model, collate(examples, range(2), layout="plain", pad_token_id=0)).sum()
        rejected = 0.0
        for prompt, response in (((5, 6, 7), (10, 11, 12)), ((5,), (14, 15))):
            for k in range(len(response)):  # p of token k after the prompt and the response's first k tokens
                one = TokenizedExample(prompt + response[:k], (response[k : k + 1],))
                logp = sequence_logprobs(model, collate([one], [0], layout="plain", pad_token_id=0))
                rejected -= torch.log1p(-logp.exp()).item()
    assert result.loss_sum.item() == pytest.approx(chosen_nll.item() + 0.5 * rejected, rel=1e-4)
    assert result.metric_sums["loss/chosen_nll"].item() == pytest.approx(chosen_nll.item(), rel=1e-4)
    assert UnlikelihoodObjective().divisor(batch) == 2 + 3 + 1 + 2


def _pairs(path, n=32):
    rows = [{"prompt": "the film", "chosen": " great fun", "rejected": " awful dull"} for _ in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_unlikelihood_training_raises_the_chosen_and_lowers_the_rejected(tiny_model_dir, tokenizer, tmp_path):
    from dpokit.api import load_model
    from dpokit.experiments.paper.baselines import train_unlikelihood
    from dpokit.data.tokenize import TokenizeConfig, tokenize_examples
    from dpokit.data.records import PreferencePair

    runs = train_unlikelihood(tiny_model_dir, _pairs(tmp_path / "pairs.jsonl"), str(tmp_path / "ul"), steps=4,
                              lr=3e-3, batch_size=8, save_every=2, threads=1)
    assert [step for step, _ in runs] == [2, 4]
    examples = tokenize_examples([PreferencePair("the film", " great fun", " awful dull")], tokenizer,
                                 TokenizeConfig(max_length=64, max_prompt_length=16))[0]
    batch = collate(examples, [0], layout="plain", pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        before = sequence_logprobs(load_model(tiny_model_dir), batch)
        after = sequence_logprobs(load_model(runs[-1][1]), batch)
    assert after[0] > before[0] + 0.5  # chosen up
    assert after[1] < before[1]  # rejected down


def test_preferred_ft_trains_on_the_chosen_responses_with_checkpoints(tiny_model_dir, tmp_path):
    from dpokit.train.metrics import read_metrics
    from dpokit.experiments.paper.baselines import train_preferred_ft

    runs = train_preferred_ft(tiny_model_dir, _pairs(tmp_path / "pairs.jsonl"), str(tmp_path / "pft"), steps=3,
                              lr=3e-3, batch_size=8, save_every=1, threads=1)
    assert [step for step, _ in runs] == [1, 2, 3]
    losses = [r["loss"] for r in read_metrics(tmp_path / "pft" / "metrics.jsonl") if r["split"] == "train"]
    assert losses[-1] < losses[0]
