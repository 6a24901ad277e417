"""`--push-to-hub` and `dpokit push`: a push that cannot work (malformed repository id, offline, no token) is a
one-line error before anything is loaded, in well under 5 seconds; `dpokit push` uploads a run's final/ or a model
directory, exactly its files (huggingface_hub's HfApi recorded: no network)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
from huggingface_hub import HfApi

from dpokit.cli.main import main


def _error(args, capsys) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    return err


@pytest.fixture
def no_token(monkeypatch):
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


@pytest.mark.parametrize("command", ["dpo", "sft", "reward", "push"])
def test_a_push_that_cannot_work_is_refused_before_anything_loads(command, no_token, tmp_path, capsys, monkeypatch):
    import dpokit.train.reward
    import dpokit.train.run

    monkeypatch.setattr(dpokit.train.run, "load_policy", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(dpokit.train.reward, "load_reward_policy", lambda *a, **k: pytest.fail("a model was loaded"))
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "the film", "chosen": " great", "rejected": " awful"}\n' * 8)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")

    def run(repo_id):
        if command == "push":
            return _error(["push", str(model), repo_id], capsys)
        return _error([command, "--model", str(model), "--data", str(data), "--output", str(tmp_path / "o"),
                       "--push-to-hub", repo_id], capsys)

    flag = "REPO_ID" if command == "push" else "--push-to-hub"
    for bad in ("no-namespace", "a/b/c", "user/bad name", "user/-x-"):
        assert f"{flag} {bad!r}: not a valid Hub repository id" in run(bad)
    assert f"{flag} user/model: no Hugging Face token: log in with `hf auth login` or set HF_TOKEN" in run("user/model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.get_token", lambda: "hf_test")
    assert "the Hugging Face Hub is in offline mode (HF_HUB_OFFLINE is set)" in run("user/model")
    assert not (tmp_path / "o").exists()


def test_the_command_line_refuses_in_under_5_seconds(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "the film", "chosen": " great", "rejected": " awful"}\n' * 8)
    env = {**os.environ, "HF_TOKEN": "", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}
    env.pop("HF_TOKEN_PATH", None)
    (tmp_path / "config.json").write_text("{}")
    started, cpu = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run([sys.executable, "-m", "dpokit.cli", "dpo", "--model", str(tmp_path), "--data", str(data),
                             "--output", str(tmp_path / "o"), "--push-to-hub", "user/model"],
                            capture_output=True, text=True, env=env, timeout=60)
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds: on a shared machine the wall clock also counts other people's work (idle: about 0.4 s)
    assert used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime < 5 and time.monotonic() - started < 30
    assert result.returncode == 2 and "--push-to-hub user/model: no Hugging Face token" in result.stderr


def test_hub_options_need_push_to_hub_and_a_final_model(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "the film", "chosen": " great", "rejected": " awful"}\n' * 8)
    base = ["dpo", "--model", str(tmp_path), "--data", str(data), "--output", str(tmp_path / "o")]
    assert "--hub-revision applies with --push-to-hub" in _error(base + ["--hub-revision", "dev"], capsys)
    assert "which --no-save-final leaves out" in _error(base + ["--push-to-hub", "u/m", "--no-save-final"], capsys)


def test_dpokit_push_uploads_the_final_directory_of_a_run_or_a_model_directory(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, *a, **k: calls.append(("create_repo", a, k)))
    monkeypatch.setattr(HfApi, "create_branch", lambda self, *a, **k: calls.append(("create_branch", a, k)))

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()
                       if not any(p.match(pattern) for pattern in kwargs["ignore_patterns"]))
        calls.append(("upload_folder", files, kwargs))
        return "https://huggingface.co/user/model/commit/1"

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: "hf_test")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    final = tmp_path / "run" / "final"
    final.mkdir(parents=True)
    for name in ("README.md", "config.json", "model.safetensors", "tokenizer.json", "dpokit_metrics.json"):
        (final / name).write_text("x")
    (tmp_path / "run" / "metrics.jsonl").write_text("{}")  # the run's own files stay home
    assert main(["push", str(tmp_path / "run"), "user/model"]) == 0
    assert "pushed" in capsys.readouterr().out
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]
    assert calls[0][1] == ("user/model",) and calls[0][2]["private"] is False
    files, upload = calls[1][1], calls[1][2]
    assert files == ["README.md", "config.json", "dpokit_metrics.json", "model.safetensors", "tokenizer.json"]
    assert (Path(upload["folder_path"]), upload["repo_id"], upload["revision"]) == (final, "user/model", None)
    calls.clear()
    assert main(["push", str(final), "user/model", "--hub-private", "--hub-revision", "v2"]) == 0  # the directory itself
    assert [c[0] for c in calls] == ["create_repo", "create_branch", "upload_folder"]
    assert calls[0][2]["private"] is True and calls[1][2]["branch"] == "v2" and calls[2][2]["revision"] == "v2"
    err = _error(["push", str(tmp_path), "user/model"], capsys)
    assert "neither a finished run" in err
