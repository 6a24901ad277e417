"""Experiment trackers through accelerate (--report-to): one tiny DPO run (3 steps, evaluated at steps 2 and 3)
reports to every tracker installed of TensorBoard, W&B (offline), MLflow (a local file store), trackio (its local
store, in a temporary directory) and Comet (an offline archive); each is read back with its own reader: the loss of
every step equals metrics.jsonl's, the config is logged as hyperparameters, and the trackers with tables have the
samples table. Nothing touches the network. A tracker not installed skips its test (pip install 'dpokit[wandb]')."""

from __future__ import annotations

import glob
import importlib.util
import json
from pathlib import Path

import pytest

from dpokit.config import TrainConfig
from dpokit.errors import ConfigError
from dpokit.train.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("single_thread")

PROJECT = "dpokit-test"
TRACKERS = [t for t in ("tensorboard", "wandb", "mlflow", "trackio", "comet_ml") if importlib.util.find_spec(t)]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, tiny_model_dir, sentiment_data):
    """The output directory of a run that reported to every tracker installed, and its metrics.jsonl rows."""
    from dpokit.train.run import train_dpo

    root = tmp_path_factory.mktemp("tracking")
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true",
           "MLFLOW_TRACKING_URI": f"file:{root / 'mlruns'}",
           "MLFLOW_ALLOW_FILE_STORE": "true", "TRACKIO_DIR": str(root / "trackio"),
           "COMET_START_ONLINE": "false", "COMET_OFFLINE_DIRECTORY": str(root / "comet")}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        config = TrainConfig(model=tiny_model_dir, data=sentiment_data["train"], eval_data=sentiment_data["eval"],
                             output=str(root / "run"), report_to=",".join(TRACKERS) or "none", project=PROJECT,
                             run_name="tiny", batch_size=4, eval_batch_size=16, max_steps=3, eval_every=2,
                             lr=1e-3, warmup_steps=0, log_samples=2, log_sample_tokens=4, save_final=False)
        train_dpo(config)
        yield root, read_metrics(root / "run" / "metrics.jsonl")


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
