"""Preparing unpaired (KTO) data keeps each example's own label, through rows that tokenisation filters out, and
KTO training on the prepared data moves the log-probs the way the labels say."""

from __future__ import annotations

import json

import pytest
import torch

from dpokit.config import TrainConfig
from dpokit.data.batching import collate
from dpokit.data.records import Completion
from dpokit.data.tokenize import TokenizedExample
from dpokit.losses.dispatch import LossConfig
from dpokit.losses.objective import KTOObjective
from dpokit.train.engine import Scorer
from dpokit.train.loop import prepare, train
from dpokit.train.prepare import kept_labels, prepare_data
from dpokit.train.reference import ModelReference
from dpokit.train.run import make_accelerator
from helpers import make_llama

pytestmark = pytest.mark.usefixtures("single_thread")

GOOD = ["the film was great", "I loved the story", "a wonderful score", "very good acting"]
BAD = ["the plot was awful", "I hated the music", "a boring slow scene", "really bad acting"]
TOO_LONG = " ".join(["the movie was really very long and slow but"] * 20)  # longer than max_length: filtered


def _rows() -> list[dict]:
    """Alternating desirable and undesirable rows, with a filtered row after the first: every label after it
    is the opposite of its neighbour's, so a label taken from the wrong row is a wrong label."""
    rows = []
    for i, (good, bad) in enumerate(zip(GOOD, BAD)):
        rows.append({"prompt": f"review {i}:", "completion": f" {good}", "label": True})
        if i == 0:
            rows.append({"prompt": "review long:", "completion": TOO_LONG, "label": False})
        rows.append({"prompt": f"review {i}b:", "completion": f" {bad}", "label": False})
    return rows


def _config(tmp_path, **overrides) -> TrainConfig:
    data = tmp_path / "unpaired.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in _rows()))
    options = dict(model="unused", data=str(data), output=str(tmp_path / "run"), max_length=32,
                   max_prompt_length=8, data_cache=False, loss="kto")
    options.update(overrides)
    return TrainConfig(**options)


def test_kept_labels_skip_the_filtered_records():
    records = [Completion("p", "a", "r0", True), Completion("p", "b", "r1", False), Completion("p", "c", "r2", False),
               Completion("p", "d", "r3", True)]
    examples = [TokenizedExample((1,), ((2,),), source) for source in ("r0", "r2", "r3")]  # r1 was filtered
    assert kept_labels(records, examples) == [True, False, True]


def _true_labels(tmp_path, examples) -> list[bool]:
    """The labels the data file gives the examples' rows (found by each example's source, "file:line")."""
    by_source = {f"{tmp_path / 'unpaired.jsonl'}:{n + 1}": row["label"] for n, row in enumerate(_rows())}
    return [by_source[e.source] for e in examples]


def test_prepared_unpaired_data_keeps_each_records_label(tmp_path, tokenizer):
    lines: list[str] = []
    prepared = prepare_data(_config(tmp_path), "kto", tokenizer, lines.append)
    assert any("filtered 1" in line for line in lines)  # the long row is gone, so labels after it had to shift
    assert len(prepared.train) == len(GOOD) + len(BAD)
    assert prepared.train_labels == _true_labels(tmp_path, prepared.train) == [True, False] * len(GOOD)


def _mean_logps(model, examples, labels, wanted: bool) -> float:
    ids = [i for i, label in enumerate(labels) if label == wanted]
    with torch.no_grad():
        return Scorer(model)(collate([examples[i] for i in ids], ids)).mean().item()


def test_kto_training_raises_the_desirable_completions(tmp_path, tokenizer):
    """A few steps of KTO on the prepared data: the policy's log-probs of the completions the data file calls
    desirable rise and those of the undesirable ones fall (the reference: a frozen copy of the starting model)."""
    config = _config(tmp_path, batch_size=4, max_steps=8, lr=3e-3, optimizer="adamw", warmup_steps=0,
                     save_final=False, seed=0)
    prepared = prepare_data(config, "kto", tokenizer, lambda line: None)
    examples, truth = prepared.train, _true_labels(tmp_path, prepared.train)
    policy = make_llama(vocab_size=len(tokenizer))
    reference = ModelReference(make_llama(vocab_size=len(tokenizer)))
    before = {wanted: _mean_logps(policy, examples, truth, wanted) for wanted in (True, False)}
    objective = KTOObjective(LossConfig("kto", 0.1), reference, torch.tensor(prepared.train_labels))
    train(prepare(policy, len(examples), config, make_accelerator(config)), tokenizer, objective, examples, None,
          config)
    after = {wanted: _mean_logps(policy, examples, truth, wanted) for wanted in (True, False)}
    assert after[True] > before[True] + 0.5
    assert after[False] < before[False] - 0.5
