"""Which tracker runs a training run reports to, kept in OUTPUT/tracker_runs.json so that ``--resume`` continues
them instead of starting new ones (a preempted job's curves stay one run in each tracker).

The first start of a run chooses the W&B run id and the Comet experiment key, and records them with the run id of
the MLflow run and the name and id of the trackio run that accelerate's trackers started (and, for reference, the
TensorBoard directory, which a resumed run writes to again anyway). A resumed run (``--resume`` with the file
present) hands them back to the trackers: W&B ``id`` with ``resume="allow"``, MLflow ``run_id``, trackio its run
name with ``resume="allow"``, Comet ``experiment_key`` with ``mode="get_or_create"``. A run that does not resume
(a new directory, ``--overwrite``) starts new tracker runs and replaces the file.

The resumed run logs its rows again from the checkpoint's step on (dpokit.train.metrics.truncate_metrics dropped the
later ones from metrics.jsonl), so a tracker may receive a step twice: docs/tracking.md says what each keeps.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path

from dpokit.runtime.files import write_atomic

TRACKER_RUNS = "tracker_runs.json"


def read_tracker_runs(output_dir: str | Path) -> dict[str, dict]:
    """The tracker runs recorded in `output_dir` (tracker name -> its identity); empty when there is no record or
    it cannot be read (a resume then starts new tracker runs rather than fail)."""
    try:
        runs = json.loads((Path(output_dir) / TRACKER_RUNS).read_text())
    except (OSError, ValueError):
        return {}
    return runs if isinstance(runs, dict) else {}


def write_tracker_runs(output_dir: str | Path, runs: dict[str, dict]) -> None:
    """Record `runs` in OUTPUT/tracker_runs.json, atomically: a kill while it is written leaves the previous record
    (a resume must never read half a file and lose the runs it continues)."""
    write_atomic(Path(output_dir) / TRACKER_RUNS, json.dumps(runs, indent=1, sort_keys=True) + "\n")


def forget_tracker_runs(output_dir: str | Path) -> None:
    """Remove the record: a run that does not resume must not let a later ``--resume`` continue the runs of the
    run it replaced (``--overwrite`` with no tracker, say)."""
    (Path(output_dir) / TRACKER_RUNS).unlink(missing_ok=True)


def init_kwargs(saved: dict[str, dict], name: str, output_dir: Path, resumed_step: int | None = None,
                log: Callable[[str], None] = print) -> dict:
    """accelerate's ``init_kwargs`` for every tracker: run `name`, and the runs `saved` (:func:`read_tracker_runs`;
    empty: new runs) continued. A run resumed at `resumed_step` hides the TensorBoard events logged after that step
    by the run it continues: they are logged again. Called on the main process only (it may ask the MLflow store
    about a run)."""
    wandb_id, comet_key = saved.get("wandb", {}).get("id"), saved.get("comet_ml", {}).get("experiment_key")
    trackio_name = saved.get("trackio", {}).get("name")
    kwargs = {
        # W&B ids and Comet keys are the caller's choice: choosing them is what lets a resume name them again
        "wandb": {"name": name, "dir": str(output_dir), "id": wandb_id or uuid.uuid4().hex[:16]},
        "comet_ml": {"experiment_key": comet_key or uuid.uuid4().hex, "mode": "create"},
        "trackio": {"name": trackio_name or name},
        "mlflow": {"run_name": name},
        # purge_step: TensorBoard's readers drop the earlier events at this step and after (SummaryWriter's
        # SessionLog START), so a repeated step shows the value logged last, as metrics.jsonl holds it
        "tensorboard": {} if resumed_step is None else {"purge_step": resumed_step + 1},
    }
    if wandb_id:
        kwargs["wandb"]["resume"] = "allow"  # "allow": a run that never reached the server is created afresh
    if comet_key:
        kwargs["comet_ml"]["mode"] = "get_or_create"
    if trackio_name:
        kwargs["trackio"]["resume"] = "allow"  # trackio resumes by name: the latest run of that name
    run_id = saved.get("mlflow", {}).get("run_id")
    if run_id and _mlflow_has_run(run_id):
        kwargs["mlflow"]["run_id"] = run_id
    elif run_id:
        log(f"mlflow: run {run_id} of {TRACKER_RUNS} is not in the tracking store "
            "(MLFLOW_TRACKING_URI changed?); starting a new run")
    return kwargs


def _mlflow_has_run(run_id: str) -> bool:
    """Whether the current MLflow store holds `run_id` (mlflow.start_run raises on a run it does not know)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.MlflowClient().get_run(run_id)
    except MlflowException:
        return False
    return True


def identities(trackers: list, log: Callable[[str], None] = print, saved: dict[str, dict] | None = None) -> dict:
    """What identifies the run each of the started `trackers` (accelerate's) reports to, to record; a trackio run
    resumed by name that is not the one `saved` names is reported (another run took that name in the meantime)."""
    found: dict[str, dict] = {}
    for tracker in trackers:
        if tracker.name == "wandb":
            found["wandb"] = {"id": tracker.run.id}
        elif tracker.name == "mlflow":
            found["mlflow"] = {"run_id": tracker.active_run.info.run_id}
        elif tracker.name == "trackio":
            found["trackio"] = {"name": tracker.run.name, "id": tracker.run.id}
            before = (saved or {}).get("trackio", {}).get("id")
            if before and before != tracker.run.id:
                log(f"trackio: the latest run named {tracker.run.name!r} is {tracker.run.id}, not {before} of "
                    f"{TRACKER_RUNS}; continuing {tracker.run.id}")
        elif tracker.name == "comet_ml":
            found["comet_ml"] = {"experiment_key": tracker.writer.get_key()}
        elif tracker.name == "tensorboard":
            found["tensorboard"] = {"logging_dir": str(tracker.logging_dir)}
    return found


def store_config(tracker, values: dict, continued_mlflow: str | None) -> None:
    """`values` as the hyperparameters of `tracker`. An MLflow run that is continued (`continued_mlflow`: its id)
    gets only the parameters it lacks: MLflow refuses to change a parameter, and a resume changes some (resume
    itself, --max-steps, ...); the others keep their first values there."""
    if tracker.name == "mlflow" and continued_mlflow:
        import mlflow

        logged = mlflow.MlflowClient().get_run(continued_mlflow).data.params
        values = {key: value for key, value in values.items() if key not in logged}
        if not values:
            return
    tracker.store_init_configuration(values)
