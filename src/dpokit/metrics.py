"""Where metrics go: metrics.jsonl in the output directory, TensorBoard when it is installed, and the console."""

from __future__ import annotations

import json
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


def read_metrics(path: str | Path) -> list[dict]:
    """All rows of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
