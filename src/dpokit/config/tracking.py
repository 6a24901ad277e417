"""The options that say where a training run's metrics go besides OUTPUT/metrics.jsonl: experiment trackers, run
through accelerate's tracking API (dpokit.train.tracking), their project and run name, and the samples table.

Standard library only: a tracker asked for but not installed is a one-line error when the config is built, before
torch, data or any model is loaded.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from dpokit.config.options import NON_NEGATIVE, POSITIVE, opt
from dpokit.errors import ConfigError

# the trackers dpokit reports to (accelerate's names), and the extra that installs each
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio",
            "comet_ml": "comet"}
TABLE_TRACKERS = ("wandb", "mlflow", "trackio", "comet_ml")  # the trackers that take the samples table


def installed(tracker: str) -> bool:
    """Whether the package of `tracker` (a name of TRACKERS) can be imported (looked up, not imported)."""
    return importlib.util.find_spec(tracker) is not None


@dataclass
class TrackingOptions:
    """Experiment trackers (TensorBoard, Weights & Biases, MLflow, trackio, Comet) through accelerate."""

    report_to: str | None = opt(None, "experiment trackers the metrics go to besides OUTPUT/metrics.jsonl: "
                                "tensorboard, wandb, mlflow, trackio, comet_ml, a comma-separated list of them, all "
                                "(those installed) or none (default: tensorboard when it is installed)")
    project: str = opt("dpokit", "the trackers' project: W&B, trackio and Comet project, MLflow experiment, "
                       "TensorBoard directory OUTPUT/tensorboard/PROJECT")
    run_name: str | None = opt(None, "the run's name in the trackers (default: the --output directory's name)")
    log_samples: int = opt(4, "at each evaluation, the policy's greedy samples of this many held-out prompts, "
                           "logged as a table to the trackers that have tables (wandb, mlflow, trackio, "
                           "comet_ml); 0 = none",
                           range=NON_NEGATIVE)
    log_sample_tokens: int = opt(32, "new tokens per sample of --log-samples", range=POSITIVE)

    def trackers(self) -> tuple[str, ...]:
        """The trackers `report_to` names, `all` resolved to those installed; checked (see check_tracking)."""
        given = self.report_to
        if given is None:
            return ("tensorboard",) if installed("tensorboard") else ()
        names = [n.strip() for n in given.split(",") if n.strip()]
        unknown = [n for n in names if n not in TRACKERS and n not in ("all", "none")]
        if unknown:
            raise ConfigError(f"--report-to {given}: unknown tracker {unknown[0]!r}; choose from "
                              f"{', '.join(TRACKERS)}, a comma-separated list of them, all or none")
        if "none" in names:
            if len(names) > 1:
                raise ConfigError(f"--report-to {given}: none excludes the other trackers")
            return ()
        if "all" in names:
            return tuple(t for t in TRACKERS if installed(t))
        missing = [n for n in names if not installed(n)]
        if missing:
            extras = ",".join(TRACKERS[n] for n in missing)
            raise ConfigError(f"--report-to {given}: {', '.join(missing)} not installed: "
                              f"pip install 'dpokit[{extras}]'")
        return tuple(dict.fromkeys(names))

    def check_tracking(self) -> None:
        """A tracker unknown or not installed, or `none` beside others, is a one-line ConfigError."""
        self.trackers()
