"""The reward model of dpokit.experiments.paper.reward_model: Bradley–Terry loss, training, and its judge."""

import json
import math

import pytest
import torch

from dpokit.experiments.paper.reward_model import bradley_terry_loss, reward_model_judge, train_reward_model

pytestmark = pytest.mark.usefixtures("single_thread")


def test_bradley_terry_loss_hand_values():
    losses = bradley_terry_loss(torch.tensor([0.0, 2.0, -1.0]), torch.tensor([0.0, 0.0, 1.0]))
    expected = [math.log(2), math.log(1 + math.exp(-2)), math.log(1 + math.exp(2))]
    torch.testing.assert_close(losses, torch.tensor(expected))


def _accuracy(judge, path) -> float:
    rows = [json.loads(line) for line in open(path)]
    chosen = judge([r["prompt"] + r["chosen"] for r in rows])
    rejected = judge([r["prompt"] + r["rejected"] for r in rows])
    return sum(c > r for c, r in zip(chosen, rejected)) / len(rows)


@pytest.fixture(scope="module")
def reward_dir(tiny_model_dir, sentiment_data, tmp_path_factory):
    lines = []
    path = train_reward_model(tiny_model_dir, sentiment_data["train"], str(tmp_path_factory.mktemp("rm") / "rm"),
                              steps=25, lr=3e-3, batch_size=16, seed=0, threads=1, log=lines.append)
    return path, lines


@pytest.mark.slow
def test_training_separates_the_pairs_and_the_judge_agrees(reward_dir, tiny_model_dir, tokenizer, sentiment_data):
    from dpokit.experiments.paper.reward_model import load_classifier

    path, lines = reward_dir
    judge = reward_model_judge(path)
    assert _accuracy(judge, sentiment_data["eval"]) > 0.9  # positive vs negative words, held-out pairs
    # the held-out part of the training file (10%), before and after training
    before, after = (float(line.split("accuracy ")[1].split()[0]) for line in lines if "held-out pairwise" in line)
    assert after > max(before, 0.9)
    assert load_classifier(tiny_model_dir, tokenizer).config.pad_token_id == tokenizer.pad_token_id


@pytest.mark.slow
def test_saved_reward_model_loads_and_pools_the_last_real_token(reward_dir, tokenizer):
    from transformers import AutoModelForSequenceClassification

    from dpokit.experiments.paper.reward_model import score_rows, text_ids

    path, _ = reward_dir
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    judge = reward_model_judge(path, batch_size=2)
    texts = ["the film was great", "a movie", "the plot was boring and dull and slow"]
    together = judge(texts)
    alone = [judge([t])[0] for t in texts]  # padding in a batch must not change a text's score
    assert together == pytest.approx(alone, abs=1e-5)
    with torch.no_grad():
        direct = score_rows(model, [text_ids(tokenizer, t) for t in texts], tokenizer.pad_token_id).tolist()
    assert together == pytest.approx(direct, abs=1e-5)
