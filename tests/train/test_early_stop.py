"""Early stopping on the held-out loss (dpokit.train.early_stop): the rule, the loop ending at the right step with
its final model, the state carried through a resume, and the options' checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpokit.api import train_dpo
from dpokit.config import TrainConfig
from dpokit.errors import ConfigError
from dpokit.train.early_stop import EarlyStopping
from dpokit.train.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("single_thread")


def test_the_rule_counts_evaluations_without_improvement():
    early = EarlyStopping(patience=2)
    decisions = [early.update(step, loss) for step, loss in [(1, 1.0), (2, 0.8), (3, 0.8), (4, 0.7), (5, 0.9),
                                                             (6, 0.75)]]
    assert decisions == [False, False, False, False, False, True]  # a tie is no improvement
    assert (early.best, early.best_step, early.since) == (0.7, 4, 2)
    assert EarlyStopping(patience=0).update(1, 1.0) is False
    never = EarlyStopping(patience=0)
    assert not any(never.update(s, 1.0 + s) for s in range(10))  # 0: never stops
    assert EarlyStopping(patience=1).state() == {"best": None, "best_step": 0, "since": 0}  # JSON-safe before any


def _scripted_losses(monkeypatch, losses: list[float]) -> list[int]:
    """The loop's evaluation returns `losses` in turn (so the stop step is known); returns the evaluated steps."""
    import dpokit.train.loop as loop

    real, steps = loop.evaluate, []

    def scripted(*args, **kwargs):
        metrics = real(*args, **kwargs)
        steps.append(len(steps))
        return {**metrics, "loss": losses[len(steps) - 1]}

    monkeypatch.setattr(loop, "evaluate", scripted)
    return steps


def _config(model, data, output, **extra) -> TrainConfig:
    return TrainConfig(model=model, data=data, output=str(output), eval_fraction=0.2, eval_every=1, save_every=1,
                       batch_size=4, lr=1e-3, optimizer="adamw", warmup_steps=0, max_length=64, max_prompt_length=16,
                       early_stopping_patience=2, threads=1, **extra)


def _evals(output) -> list[int]:
    return [r["step"] for r in read_metrics(Path(output) / "metrics.jsonl") if r["split"] == "eval"]


def test_the_run_ends_at_the_evaluation_that_runs_out_of_patience(tiny_model_dir, sentiment_data, tmp_path,
                                                                   monkeypatch, capsys):
    _scripted_losses(monkeypatch, [1.0, 0.9, 0.95, 0.97, 0.5, 0.4])
    metrics = train_dpo(_config(tiny_model_dir, sentiment_data["train"], tmp_path / "run", max_steps=10))
    assert _evals(tmp_path / "run") == [1, 2, 3, 4]  # best at 2, then 2 without improvement: stop at 4
    assert metrics["loss"] == 0.97
    assert "early stop at step 4: the held-out loss has not improved for 2 evaluations (best 0.9000 at step 2" \
        in capsys.readouterr().out
    state = json.loads((tmp_path / "run" / "checkpoint-000004" / "trainer_state.json").read_text())
    assert state["early_stopping"] == {"best": 0.9, "best_step": 2, "since": 2}
    assert not (tmp_path / "run" / "checkpoint-000005").exists() and (tmp_path / "run" / "final").is_dir()


def test_a_resumed_run_keeps_counting(tiny_model_dir, sentiment_data, tmp_path, monkeypatch):
    _scripted_losses(monkeypatch, [1.0, 0.9, 0.95])
    train_dpo(_config(tiny_model_dir, sentiment_data["train"], tmp_path / "run", max_steps=3))
    assert _evals(tmp_path / "run") == [1, 2, 3]  # ended by --max-steps, one evaluation without improvement
    monkeypatch.undo()
    _scripted_losses(monkeypatch, [0.97, 0.5])
    train_dpo(_config(tiny_model_dir, sentiment_data["train"], tmp_path / "run", max_steps=10, resume=True))
    assert _evals(tmp_path / "run") == [1, 2, 3, 4]  # the saved count (1) plus one: stop at 4, not 5


def test_early_stopping_needs_evaluations(tiny_model_dir, sentiment_data, tmp_path):
    common = dict(model=tiny_model_dir, data=sentiment_data["train"], output=str(tmp_path / "o"),
                  early_stopping_patience=2)
    with pytest.raises(ConfigError, match="needs held-out data"):
        TrainConfig(**common, eval_every=5)
    with pytest.raises(ConfigError, match="needs --eval-every N"):
        TrainConfig(**common, eval_fraction=0.1)
    TrainConfig(**common, eval_fraction=0.1, eval_every=5)
