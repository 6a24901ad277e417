"""Metrics: metrics.jsonl rows, and TensorBoard events when tensorboard is installed (it is in the test extra)."""

import pytest

from dpokit.train.metrics import MetricsLogger, read_metrics


def test_rows_are_appended_as_json_lines(tmp_path):
    log = MetricsLogger(tmp_path)
    log.write("train", 1, {"loss": 0.5})
    log.write("eval", 1, {"loss": 0.25})
    log.close()
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"split": "train", "step": 1, "loss": 0.5},
                                                        {"split": "eval", "step": 1, "loss": 0.25}]


def test_tensorboard_events_are_written(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLogger(tmp_path)
    for step, loss in ((1, 0.7), (2, 0.6)):
        log.write("train", step, {"loss": loss, "rewards/accuracies": 0.5})
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("train/loss")] == [(1, 0.7), (2, 0.6)]
    assert "train/rewards/accuracies" in events.Tags()["scalars"]


def test_other_processes_write_nothing(tmp_path):
    log = MetricsLogger(tmp_path / "out", enabled=False)
    log.write("train", 1, {"loss": 1.0})
    assert not (tmp_path / "out").exists()
