"""Where metrics go: metrics.jsonl in the output directory, TensorBoard when it is installed, and the console."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tqdm.auto import tqdm


class MetricsLogger:
    """Appends one JSON object per logged step to OUTPUT/metrics.jsonl (and TensorBoard, if installed)."""

    def __init__(self, output_dir: str | Path, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.board = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.board = SummaryWriter(str(Path(output_dir) / "tensorboard"))
            except ImportError:  # TensorBoard is optional
                self.board = None

    def write(self, split: str, step: int, values: dict[str, float]) -> None:
        """Record `values` of `split` ("train" or "eval") at `step`."""
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps({"split": split, "step": step, **values}) + "\n")
        if self.board is not None:
            for key, value in values.items():
                self.board.add_scalar(f"{split}/{key}", value, step)

    def print(self, message: str) -> None:
        """Print a line without breaking the progress bar."""
        if self.enabled:
            tqdm.write(message)

    def close(self) -> None:
        """Flush TensorBoard."""
        if self.board is not None:
            self.board.close()


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
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dropped


def read_metrics(path: str | Path) -> list[dict]:
    """All rows of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
