"""Where metrics go: metrics.jsonl in the output directory, the experiment trackers (dpokit.train.tracking), and
the console."""

from __future__ import annotations

import json
from pathlib import Path

from tqdm.auto import tqdm

from dpokit.runtime.files import write_atomic


class MetricsLogger:
    """Appends one JSON object per logged step to OUTPUT/metrics.jsonl, and sends it to the run's experiment
    trackers (TensorBoard, W&B, MLflow, ...: dpokit.train.tracking), at the same step."""

    def __init__(self, output_dir: str | Path, *, enabled: bool = True, tracking=None) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.tracking = tracking  # a dpokit.train.tracking.Tracking, or None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, split: str, step: int, values: dict[str, float]) -> None:
        """Record `values` of `split` ("train" or "eval") at `step`."""
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps({"split": split, "step": step, **values}) + "\n")
        if self.tracking is not None:
            self.tracking.log(split, step, values)

    def print(self, message: str) -> None:
        """Print a line without breaking the progress bar."""
        if self.enabled:
            tqdm.write(message)

    def close(self) -> None:
        """Nothing to flush: each row is written whole (the trackers are finished by the run: train/run.py)."""


def truncate_metrics(output_dir: str | Path, step: int) -> int:
    """Keep the rows of OUTPUT/metrics.jsonl up to `step` (a resume continues from there, so every step is
    logged once) and drop a last line cut short by a kill. Rewritten atomically; returns the rows dropped."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a row the kill interrupted
            dropped += 1
            continue
        if row.get("step", 0) <= step:
            kept.append(line + "\n")
        else:
            dropped += 1
    # A resume killed (or out of disk) during the rewrite must not lose the rows: the new rows go to a temporary
    # file that replaces the old one only once written whole.
    write_atomic(path, "".join(kept))
    return dropped


def read_metrics(path: str | Path) -> list[dict]:
    """All rows of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
