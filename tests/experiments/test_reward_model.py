"""The reward model of dpokit.experiments.paper.reward_model: `dpokit reward`'s loop on the pairs, and its judge."""

import json
from pathlib import Path

import pytest
import torch

from dpokit.experiments.paper.reward_model import reward_model_judge, train_reward_model

pytestmark = pytest.mark.usefixtures("single_thread")


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
def test_training_separates_the_pairs_and_the_judge_agrees(reward_dir, sentiment_data):
    path, lines = reward_dir
    assert _accuracy(reward_model_judge(path), sentiment_data["eval"]) > 0.9  # positive vs negative words
    # `dpokit reward`'s own held-out accuracy (10% of the training file), as the loop reports it
    [line] = [line for line in lines if "held-out pairwise accuracy" in line]
    assert float(line.split("accuracy ")[1].split()[0]) > 0.9
    # it is a `dpokit reward` run: its card and metrics sit in the output directory
    assert (Path(path) / "README.md").is_file() and (Path(path).parent / "metrics.jsonl").is_file()


@pytest.mark.slow
def test_saved_reward_model_loads_and_pools_the_last_real_token(reward_dir, tokenizer):
    from transformers import AutoModelForSequenceClassification

    from dpokit.judges.reward_rows import score_rows, text_ids

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
