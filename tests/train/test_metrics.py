"""Metrics: metrics.jsonl rows, their truncation on resume (atomic), and the same rows sent to the experiment
trackers (dpokit.train.tracking)."""

import builtins
import errno
import io
import json
import pathlib

import pytest

from dpokit.train.metrics import MetricsLogger, read_metrics, truncate_metrics


def test_rows_are_appended_as_json_lines(tmp_path):
    log = MetricsLogger(tmp_path)
    log.write("train", 1, {"loss": 0.5})
    log.write("eval", 1, {"loss": 0.25})
    log.close()
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"split": "train", "step": 1, "loss": 0.5},
                                                        {"split": "eval", "step": 1, "loss": 0.25}]


def test_rows_go_to_the_trackers_at_their_steps(tmp_path):
    """The experiment trackers get every row metrics.jsonl gets (tests/train/test_tracking.py reads them back)."""

    class Tracking:
        rows = []

        def log(self, split, step, values):
            self.rows.append((split, step, values))

    log = MetricsLogger(tmp_path, tracking=Tracking())
    log.write("train", 1, {"loss": 0.7})
    log.write("eval", 1, {"loss": 0.6})
    assert Tracking.rows == [("train", 1, {"loss": 0.7}), ("eval", 1, {"loss": 0.6})]
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 2


def test_other_processes_write_nothing(tmp_path):
    log = MetricsLogger(tmp_path / "out", enabled=False)
    log.write("train", 1, {"loss": 1.0})
    assert not (tmp_path / "out").exists()


def _rows(*steps):
    return "".join(json.dumps({"split": "train", "step": s, "loss": 1.0 / s}) + "\n" for s in steps)


def test_truncation_keeps_the_rows_up_to_the_step_and_drops_a_cut_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(_rows(1, 2, 3, 4) + '{"split": "tr')
    assert truncate_metrics(tmp_path, 2) == 3
    assert path.read_text() == _rows(1, 2)
    assert list(tmp_path.iterdir()) == [path]


class _DiskFull:
    """A file open for writing that takes half of what is written, then fails as a full disk does."""

    def __init__(self, handle):
        self.handle = handle

    def write(self, text):
        self.handle.write(text[: len(text) // 2])
        self.handle.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


def test_a_rewrite_that_fails_partway_leaves_the_old_file_intact(tmp_path, monkeypatch):
    """Whichever way the rows are written (Path.write_text, Path.open, open), a write that fails after part of its
    output leaves metrics.jsonl as it was, and no temporary file behind."""
    path = tmp_path / "metrics.jsonl"
    old = _rows(1, 2, 3, 4)
    path.write_text(old)
    real_open = builtins.open

    def failing_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        return _DiskFull(handle) if any(m in mode for m in "wax+") else handle

    def failing_write_text(self, data, *args, **kwargs):
        with failing_open(self, "w") as handle:
            handle.write(data)

    monkeypatch.setattr(builtins, "open", failing_open)
    monkeypatch.setattr(io, "open", failing_open)
    monkeypatch.setattr(pathlib.Path, "open", lambda self, mode="r", *a, **k: failing_open(self, mode, *a, **k))
    monkeypatch.setattr(pathlib.Path, "write_text", failing_write_text)
    with pytest.raises(OSError, match="No space left"):
        truncate_metrics(tmp_path, 2)
    monkeypatch.undo()
    assert path.read_text() == old
    assert list(tmp_path.iterdir()) == [path]
