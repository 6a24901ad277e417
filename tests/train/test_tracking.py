"""Experiment trackers through accelerate (--report-to): one tiny DPO run (3 steps, evaluated at steps 2 and 3)
reports to every tracker installed of TensorBoard, W&B (offline), MLflow (a local file store), trackio (its local
store, in a temporary directory) and Comet (an offline archive); each is read back with its own reader: the loss of
every step equals metrics.jsonl's, the config is logged as hyperparameters, and the trackers with tables have the
samples table. Nothing touches the network. A tracker not installed skips its test (pip install 'dpokit[wandb]')."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest

from dpokit.config import TrainConfig
from dpokit.errors import ConfigError
from dpokit.train.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("single_thread")

PROJECT = "dpokit-test"
TRACKERS = [t for t in ("tensorboard", "wandb", "mlflow", "trackio", "comet_ml") if importlib.util.find_spec(t)]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A directory for the trackers' local stores, set in the environment for this module: W&B offline, MLflow's
    file store, trackio's store; each run's Comet archives go where its fixture says (COMET_OFFLINE_DIRECTORY)."""
    root = tmp_path_factory.mktemp("tracking")
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true",
           "MLFLOW_TRACKING_URI": f"file:{root / 'mlruns'}",
           "MLFLOW_ALLOW_FILE_STORE": "true", "TRACKIO_DIR": str(root / "trackio"),
           "COMET_START_ONLINE": "false"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        yield root, patch


@pytest.fixture(scope="module")
def tracked(stores, tiny_model_dir, sentiment_data):
    """The output directory of a run that reported to every tracker installed, and its metrics.jsonl rows."""
    from dpokit.train.run import train_dpo

    root, patch = stores
    patch.setenv("COMET_OFFLINE_DIRECTORY", str(root / "comet"))
    config = TrainConfig(model=tiny_model_dir, data=sentiment_data["train"], eval_data=sentiment_data["eval"],
                         output=str(root / "run"), report_to=",".join(TRACKERS) or "none", project=PROJECT,
                         run_name="tiny", batch_size=4, eval_batch_size=16, max_steps=3, eval_every=2,
                         lr=1e-3, warmup_steps=0, log_samples=2, log_sample_tokens=4, save_final=False)
    train_dpo(config)
    return root, read_metrics(root / "run" / "metrics.jsonl")


def _losses(rows, split):
    return {r["step"]: r["loss"] for r in rows if r["split"] == split}


def test_tensorboard_has_every_logged_loss_and_the_config(tracked):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, rows = tracked
    events = EventAccumulator(str(root / "run" / "tensorboard" / PROJECT))
    events.Reload()
    for split in ("train", "eval"):
        logged = {e.step: e.value for e in events.Scalars(f"{split}/loss")}
        assert logged == pytest.approx(_losses(rows, split), abs=1e-6)
    hparams = glob.glob(str(root / "run" / "tensorboard" / PROJECT / "*" / "hparams.yml"))
    assert "lr: 0.001" in Path(hparams[0]).read_text()


def _wandb_records(path):
    """The records of a W&B run file (.wandb: a LevelDB-style log of protobuf Records, 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2

    data, block = Path(path).read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL, FIRST; MIDDLE and LAST continue
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def test_wandb_offline_run_holds_the_loss_the_config_and_the_samples_table(tracked):
    pytest.importorskip("wandb")
    root, rows = tracked
    (run_file,) = glob.glob(str(root / "run" / "wandb" / "offline-run-*" / "run-*.wandb"))
    history, config = [], {}
    for record in _wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "run":
            assert (record.run.project, record.run.display_name) == (PROJECT, "tiny")
    for split in ("train", "eval"):
        logged = {h["_step"]: h[f"{split}/loss"] for h in history if f"{split}/loss" in h}
        assert logged == pytest.approx(_losses(rows, split), abs=1e-6)
    assert config["lr"] == 0.001 and config["loss"] == "sigmoid" and config["report_to"]
    assert sorted(h["_step"] for h in history if h.get("samples/_type") == "table-file") == [2, 3]
    (table,) = glob.glob(str(Path(run_file).parent / "files" / "media" / "table" / "samples_2_*.table.json"))
    table = json.loads(Path(table).read_text())
    assert table["columns"] == ["step", "prompt", "sample"] and len(table["data"]) == 2


def test_mlflow_run_holds_the_loss_the_params_and_the_samples_table(tracked):
    mlflow = pytest.importorskip("mlflow")
    root, rows = tracked
    runs = mlflow.search_runs(experiment_names=[PROJECT])  # MLFLOW_TRACKING_URI: the run's store
    assert len(runs) == 1 and runs["tags.mlflow.runName"][0] == "tiny"
    assert runs["params.lr"][0] == "0.001" and runs["params.loss"][0] == "sigmoid"
    client = mlflow.MlflowClient()
    run_id = runs["run_id"][0]
    for split in ("train", "eval"):
        logged = {m.step: m.value for m in client.get_metric_history(run_id, f"{split}/loss")}
        assert logged == pytest.approx(_losses(rows, split), abs=1e-6)
    table = mlflow.artifacts.load_dict(f"{runs['artifact_uri'][0]}/samples/step_000003.json")
    assert table["columns"] == ["step", "prompt", "sample"] and len(table["data"]) == 2


def test_trackio_store_holds_the_loss_the_config_and_the_samples_table(tracked):
    pytest.importorskip("trackio")
    from trackio.sqlite_storage import SQLiteStorage

    root, rows = tracked
    if not str(SQLiteStorage.get_project_db_path(PROJECT)).startswith(str(root)):
        pytest.skip("trackio was imported before TRACKIO_DIR was set: its store is elsewhere")
    logs = SQLiteStorage.get_logs(PROJECT, "tiny")
    for split in ("train", "eval"):
        logged = {entry["step"]: entry[f"{split}/loss"] for entry in logs if f"{split}/loss" in entry}
        assert logged == pytest.approx(_losses(rows, split), abs=1e-6)
    assert SQLiteStorage.get_run_config(PROJECT, "tiny")["lr"] == 0.001
    tables = [entry["samples"] for entry in logs if "samples" in entry]
    assert len(tables) == 2 and tables[0]["_type"] == "trackio.table" and len(tables[0]["_value"]) == 2


def test_comet_offline_archive_holds_the_loss_and_the_config(tracked):
    pytest.importorskip("comet_ml")
    import zipfile

    root, rows = tracked
    (archive,) = glob.glob(str(root / "comet" / "*.zip"))
    messages = [json.loads(line) for line in zipfile.ZipFile(archive).read("messages.json").decode().splitlines()]
    payloads = {kind: [m["payload"] for m in messages if m["type"] == kind]
                for kind in ("metric_msg", "parameter_msg", "log_other")}
    for split in ("train", "eval"):
        logged = {p["metric"]["step"]: p["metric"]["metricValue"] for p in payloads["metric_msg"]
                  if p["metric"]["metricName"] == f"{split}/loss"}
        assert logged == pytest.approx(_losses(rows, split), abs=1e-6)
    assert {p["param"]["paramName"]: p["param"]["paramValue"] for p in payloads["parameter_msg"]}["lr"] == 0.001
    assert {"key": "Name", "value": "tiny"} in [{k: p[k] for k in ("key", "value")} for p in payloads["log_other"]]
    # the samples table at each evaluation (steps 2 and 3): a CSV asset with a row per held-out prompt
    uploads = {m["payload"]["additional_params"]["fileName"]: m["payload"] for m in messages
               if m["type"] == "file_upload" and m["payload"].get("upload_type") == "asset"}
    assert sorted(uploads) == ["samples_step_000002.csv", "samples_step_000003.csv"]
    assert uploads["samples_step_000003.csv"]["additional_params"]["step"] == 3
    lines = zipfile.ZipFile(archive).read(uploads["samples_step_000002.csv"]["file_path"]).decode().splitlines()
    assert lines[0] == "step,prompt,sample" and len([line for line in lines if line.startswith("2,")]) == 2


# --- a resumed run continues its tracker runs ---------------------------------------------------------------

RESUMED = "dpokit-resume"  # the project of the resumed and overwritten runs


def _train(root: Path, name: str, model: str, data: str, **values) -> Path:
    """A tiny DPO run in root/name reporting to every tracker installed (no evaluation: only training rows)."""
    from dpokit.train.run import train_dpo

    train_dpo(TrainConfig(model=model, data=data, output=str(root / name), report_to=",".join(TRACKERS) or "none",
                          project=RESUMED, run_name=name, batch_size=4, lr=1e-3, warmup_steps=0, save_every=2,
                          save_final=False, **values))
    return root / name


@pytest.fixture(scope="module")
def resumed(stores, tiny_model_dir, sentiment_data):
    """A run of 3 steps whose last checkpoint is then deleted (as if killed after logging step 3, before saving
    it), resumed from step 2 to 4: its directory, the tracker runs recorded before and after the resume, the
    metrics rows before the resume and after it."""
    from dpokit.train.tracker_runs import read_tracker_runs

    root, patch = stores
    patch.setenv("COMET_OFFLINE_DIRECTORY", str(root / "comet-resumed"))
    output = _train(root, "resumed", tiny_model_dir, sentiment_data["train"], max_steps=3)
    first, first_rows = read_tracker_runs(output), read_metrics(output / "metrics.jsonl")
    shutil.rmtree(output / "checkpoint-000003")
    _train(root, "resumed", tiny_model_dir, sentiment_data["train"], max_steps=4, resume=True)
    return output, first, read_tracker_runs(output), first_rows, read_metrics(output / "metrics.jsonl")


@pytest.fixture(scope="module")
def overwritten(stores, tiny_model_dir, sentiment_data):
    """The tracker runs recorded by a run of 1 step and by the run of 1 step that --overwrite puts in its place."""
    from dpokit.train.tracker_runs import read_tracker_runs

    root, patch = stores
    patch.setenv("COMET_OFFLINE_DIRECTORY", str(root / "comet-overwritten"))
    output = _train(root, "overwritten", tiny_model_dir, sentiment_data["train"], max_steps=1)
    first = read_tracker_runs(output)
    _train(root, "overwritten", tiny_model_dir, sentiment_data["train"], max_steps=1, overwrite=True)
    return output, first, read_tracker_runs(output)


def _train_losses(rows) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in rows if r["split"] == "train"]


def _logged_again(resumed) -> list[tuple[int, float]]:
    """The train losses a tracker that keeps every value got: steps 1-3 of the first run, then 3-4 of the resume."""
    _, _, _, first_rows, rows = resumed
    return _train_losses(first_rows) + [(s, v) for s, v in _train_losses(rows) if s >= 3]


def _assert_logged(logged: list[tuple[int, float]], expected: list[tuple[int, float]]) -> None:
    """The same steps in the same order, and the same values to 1e-6."""
    assert [step for step, _ in logged] == [step for step, _ in expected]
    assert [value for _, value in logged] == pytest.approx([value for _, value in expected], abs=1e-6)


def test_a_resume_records_the_same_tracker_runs(resumed):
    output, first, second, first_rows, rows = resumed
    assert set(first) == set(TRACKERS) and second == first
    assert [s for s, _ in _train_losses(first_rows)] == [1, 2, 3]
    assert [s for s, _ in _train_losses(rows)] == [1, 2, 3, 4]


def test_a_resumed_mlflow_run_is_one_run_with_steps_1_to_4(resumed):
    mlflow = pytest.importorskip("mlflow")
    output, first, _, _, rows = resumed
    runs = mlflow.search_runs(experiment_names=[RESUMED], filter_string="tags.mlflow.runName = 'resumed'")
    assert list(runs["run_id"]) == [first["mlflow"]["run_id"]] and runs["status"][0] == "FINISHED"
    history = mlflow.MlflowClient().get_metric_history(first["mlflow"]["run_id"], "train/loss")
    logged = [(m.step, m.value) for m in sorted(history, key=lambda m: (m.step, m.timestamp))]
    _assert_logged(logged, _logged_again(resumed))  # MLflow keeps both values of step 3
    # a parameter keeps its first value (MLflow cannot change one): the resume's max_steps 4 is not logged
    assert runs["params.max_steps"][0] == "3" and runs["params.resume"][0] == "False"


def test_a_resumed_wandb_run_keeps_its_id(resumed):
    pytest.importorskip("wandb")
    output, first, _, _, rows = resumed
    # in start order: by the time each was last written (two starts in one second are named ID and ID-1, and
    # "-" sorts before "/", so names do not give the order)
    files = sorted(glob.glob(str(output / "wandb" / "offline-run-*" / "run-*.wandb")), key=os.path.getmtime)
    assert len(files) == 2 and all(f.endswith(f"-{first['wandb']['id']}.wandb") for f in files)
    logged = []
    for path in files:
        for record in _wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                assert (record.run.run_id, record.run.display_name) == (first["wandb"]["id"], "resumed")
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                logged.append((items["_step"], items["train/loss"]))
    _assert_logged(logged, _logged_again(resumed))


def test_a_resumed_trackio_run_is_one_run_with_steps_1_to_4(resumed):
    pytest.importorskip("trackio")
    from trackio.sqlite_storage import SQLiteStorage

    output, first, _, _, rows = resumed
    if not str(SQLiteStorage.get_project_db_path(RESUMED)).startswith(str(output.parent)):
        pytest.skip("trackio was imported before TRACKIO_DIR was set: its store is elsewhere")
    records = [r for r in SQLiteStorage.get_run_records(RESUMED) if r["name"] == "resumed"]
    assert [r["id"] for r in records] == [first["trackio"]["id"]]
    logs = SQLiteStorage.get_logs(RESUMED, run_id=first["trackio"]["id"])
    logged = [(e["step"], e["train/loss"]) for e in logs if "train/loss" in e]
    _assert_logged(logged, _logged_again(resumed))  # trackio keeps both values of step 3
    assert SQLiteStorage.get_run_config(RESUMED, run_id=first["trackio"]["id"])["max_steps"] == 4


def test_a_resumed_tensorboard_run_shows_steps_1_to_4_once(resumed):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output, first, _, _, rows = resumed
    events = EventAccumulator(first["tensorboard"]["logging_dir"])
    events.Reload()
    assert len(glob.glob(f"{first['tensorboard']['logging_dir']}/events.out.tfevents.*")) == 2  # one per start
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    _assert_logged(logged, _train_losses(rows))  # the resume's step 3 replaces the first's


def test_a_resumed_comet_experiment_keeps_its_key(resumed):
    pytest.importorskip("comet_ml")
    import zipfile

    output, first, _, _, rows = resumed
    logged = []
    for archive in glob.glob(str(output.parent / "comet-resumed" / "*.zip")):
        with zipfile.ZipFile(archive) as zipped:
            assert json.loads(zipped.read("experiment.json"))["offline_id"] == first["comet_ml"]["experiment_key"]
            messages = [json.loads(line) for line in zipped.read("messages.json").decode().splitlines()]
        logged += [(m["payload"]["metric"]["step"], m["payload"]["metric"]["metricValue"]) for m in messages
                   if m["type"] == "metric_msg" and m["payload"]["metric"]["metricName"] == "train/loss"]
    _assert_logged(sorted(logged), sorted(_logged_again(resumed)))  # both archives hold step 3


def test_overwrite_starts_new_tracker_runs(overwritten):
    output, first, second = overwritten
    assert set(first) == set(second) == set(TRACKERS)
    for name in set(TRACKERS) - {"tensorboard"}:  # TensorBoard has no run id: its directory is the run's
        assert first[name] != second[name], name
    if "mlflow" in TRACKERS:
        import mlflow

        runs = mlflow.search_runs(experiment_names=[RESUMED], filter_string="tags.mlflow.runName = 'overwritten'")
        assert sorted(runs["run_id"]) == sorted([first["mlflow"]["run_id"], second["mlflow"]["run_id"]])
    if "wandb" in TRACKERS:
        ids = {Path(p).name.rpartition("-")[2] for p in glob.glob(str(output / "wandb" / "offline-run-*"))}
        assert ids == {first["wandb"]["id"], second["wandb"]["id"]}


def test_a_fresh_run_without_trackers_forgets_the_recorded_ones(tmp_path):
    from dpokit.train.tracker_runs import TRACKER_RUNS, read_tracker_runs, write_tracker_runs
    from dpokit.train.tracking import Tracking

    class NoTrackers:
        is_main_process, log_with = True, []

    write_tracker_runs(tmp_path, {"wandb": {"id": "abc"}})
    assert read_tracker_runs(tmp_path) == {"wandb": {"id": "abc"}}
    resume = TrainConfig(model="m", data="d", output=str(tmp_path), report_to="none", resume=True)
    Tracking(NoTrackers(), resume).start({})
    assert read_tracker_runs(tmp_path) == {"wandb": {"id": "abc"}}  # a resume without trackers keeps them
    Tracking(NoTrackers(), TrainConfig(model="m", data="d", output=str(tmp_path), report_to="none")).start({})
    assert not (tmp_path / TRACKER_RUNS).exists()


def test_init_kwargs_continue_the_recorded_runs_and_choose_new_ones_otherwise(stores, tmp_path):
    from dpokit.train.tracker_runs import init_kwargs

    fresh = init_kwargs({}, "tiny", tmp_path)
    assert fresh["mlflow"] == {"run_name": "tiny"} and fresh["tensorboard"] == {}
    assert "resume" not in fresh["wandb"] and "resume" not in fresh["trackio"] and fresh["comet_ml"]["mode"] == "create"
    assert fresh["wandb"]["id"] != init_kwargs({}, "tiny", tmp_path)["wandb"]["id"]
    saved = {"wandb": {"id": "w1"}, "trackio": {"name": "first-name", "id": "t1"},
             "comet_ml": {"experiment_key": "c" * 32}}
    again = init_kwargs(saved, "tiny", tmp_path, resumed_step=500)
    assert again["wandb"] == {"name": "tiny", "dir": str(tmp_path), "id": "w1", "resume": "allow"}
    assert again["trackio"] == {"name": "first-name", "resume": "allow"}
    assert again["comet_ml"] == {"experiment_key": "c" * 32, "mode": "get_or_create"}
    assert again["tensorboard"] == {"purge_step": 501}
    if "mlflow" in TRACKERS:  # a run the store does not hold (another MLFLOW_TRACKING_URI): a new run, said so
        said = []
        lost = init_kwargs({"mlflow": {"run_id": "0" * 32}}, "tiny", tmp_path, resumed_step=2, log=said.append)
        assert lost["mlflow"] == {"run_name": "tiny"} and "is not in the tracking store" in said[0]


# --- the options -------------------------------------------------------------------------------------------


def _config(**values) -> TrainConfig:
    return TrainConfig(model="m", data="d", output="o", **values)


def test_report_to_resolves_lists_all_and_none(monkeypatch):
    import dpokit.config.tracking as tracking

    monkeypatch.setattr(tracking, "installed", lambda name: name in ("tensorboard", "mlflow"))
    assert _config().trackers() == ("tensorboard",)  # the default: TensorBoard when it is installed
    assert _config(report_to="mlflow, tensorboard,mlflow").trackers() == ("mlflow", "tensorboard")
    assert _config(report_to="all").trackers() == ("tensorboard", "mlflow")
    assert _config(report_to="none").trackers() == ()
    monkeypatch.setattr(tracking, "installed", lambda name: False)
    assert _config().trackers() == ()


@pytest.mark.parametrize("given,words", [("wandb", "wandb not installed: pip install 'dpokit[wandb]'"),
                                         ("comet_ml,trackio", "comet_ml, trackio not installed: pip install "
                                                              "'dpokit[comet,trackio]'"),
                                         ("neptune", "unknown tracker 'neptune'"),
                                         ("none,wandb", "none excludes the other trackers")])
def test_a_tracker_unknown_or_not_installed_is_a_one_line_error(monkeypatch, given, words):
    import dpokit.config.tracking as tracking

    monkeypatch.setattr(tracking, "installed", lambda name: name == "tensorboard")
    with pytest.raises(ConfigError, match="^--report-to") as error:
        _config(report_to=given)
    assert words in str(error.value) and "\n" not in str(error.value)


def test_the_command_line_refuses_a_missing_tracker_before_loading_anything(monkeypatch, capsys, tmp_path):
    import dpokit.config.tracking as tracking
    from dpokit.cli.main import main

    monkeypatch.setattr(tracking, "installed", lambda name: False)
    code = main(["dpo", "--model", str(tmp_path / "absent"), "--data", str(tmp_path / "absent.jsonl"),
                 "--output", str(tmp_path / "out"), "--report-to", "wandb"])
    assert code != 0
    assert "--report-to wandb: wandb not installed" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_no_tracker_no_accelerator_trackers():
    from dpokit.train.tracking import accelerator_options

    assert accelerator_options(_config(report_to="none")) == {}
