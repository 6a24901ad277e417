"""Early stopping on the held-out loss (``--early-stopping-patience N``): a run ends at the evaluation after which
the held-out loss has not improved for N evaluations in a row, instead of at --max-steps/--epochs.

Every process takes the same decision: the evaluation's loss is reduced over all processes before it is read. The
state (best loss, its step, evaluations since) is saved in each checkpoint's trainer_state.json, so a resumed run
stops where the uninterrupted one would have.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class EarlyStopping:
    """The held-out loss's best value and step so far and how many evaluations have not improved on it."""

    patience: int  # 0: never stop early
    best: float = math.inf
    best_step: int = 0
    since: int = 0
    stopped: bool = False  # set by the loop when it ends the run here

    @classmethod
    def restored(cls, patience: int, checkpoint: Path | None) -> "EarlyStopping":
        """A fresh state, or the one saved in `checkpoint`'s trainer_state.json (a resumed run)."""
        if checkpoint is None:
            return cls(patience)
        saved = json.loads((checkpoint / "trainer_state.json").read_text()).get("early_stopping") or {}
        fields = {k: saved[k] for k in ("best", "best_step", "since") if saved.get(k) is not None}
        return cls(patience, **fields)

    def update(self, step: int, loss: float) -> bool:
        """Record the evaluation at `step`; whether the run should stop now (never when patience is 0)."""
        if loss < self.best:
            self.best, self.best_step, self.since = loss, step, 0
        else:
            self.since += 1
        return 0 < self.patience <= self.since

    def state(self) -> dict:
        """What a checkpoint saves (JSON: an infinite best, before any evaluation, is written as null)."""
        state = asdict(self)
        del state["patience"], state["stopped"]
        return {**state, "best": None if math.isinf(self.best) else self.best}

    def message(self, step: int) -> str:
        """The line a run prints when it stops early."""
        return (f"early stop at step {step}: the held-out loss has not improved for {self.since} evaluations "
                f"(best {self.best:.4f} at step {self.best_step}, checkpoint-{self.best_step:06d} if it was saved)")
