"""The output directory: no silent reuse, one run at a time, the user's umask, resume identity and bounds,
SIGINT/SIGTERM, a full disk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dpokit.cli.main import main
from dpokit.errors import EXIT_INTERRUPTED
from dpokit.train.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("single_thread")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _args(model, data, out, *extra):
    return ["dpo", "--model", model, "--data", data, "--output", str(out), "--batch-size", "4", "--lr", "1e-3",
            "--warmup-steps", "0", *extra]


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


@pytest.fixture
def finished(tiny_model_dir, sentiment_data, tmp_path):
    out = tmp_path / "run"
    assert main(_args(tiny_model_dir, sentiment_data["train"], out, "--max-steps", "4", "--save-every", "2")) == 0
    return out


def test_a_directory_holding_a_run_is_refused_and_left_untouched(finished, tiny_model_dir, sentiment_data, capsys):
    before = _snapshot(finished)
    assert main(_args(tiny_model_dir, sentiment_data["train"], finished, "--max-steps", "2")) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert _snapshot(finished) == before


def test_overwrite_replaces_the_run(finished, tiny_model_dir, sentiment_data):
    assert main(_args(tiny_model_dir, sentiment_data["train"], finished, "--max-steps", "1", "--overwrite")) == 0
    assert sorted(p.name for p in finished.glob("checkpoint-*")) == ["checkpoint-000001"]
    assert [r["step"] for r in read_metrics(finished / "metrics.jsonl")] == [1]


def test_a_run_of_an_older_release_resumes_when_the_new_options_hold_their_defaults(finished, tiny_model_dir,
                                                                                  sentiment_data, capsys):
    import json

    from dpokit.train.checkpoint import write_manifest

    for checkpoint in finished.glob("checkpoint-*"):  # as written before --attention existed
        state_path = checkpoint / "trainer_state.json"
        state = json.loads(state_path.read_text())
        del state["identity"]["config"]["attention"]
        state_path.write_text(json.dumps(state))
        write_manifest(checkpoint)
    args = _args(tiny_model_dir, sentiment_data["train"], finished, "--resume", "--max-steps", "5")
    assert main(args + ["--attention", "sdpa"]) == 2  # not its default: the run would compute otherwise
    assert "belongs to another run (attention None -> 'sdpa')" in capsys.readouterr().err
    assert main(args) == 0


def test_resume_past_max_steps_or_of_another_run_is_refused(finished, tiny_model_dir, sentiment_data, tmp_path,
                                                           capsys):
    args = _args(tiny_model_dir, sentiment_data["train"], finished, "--resume")
    assert main(args + ["--max-steps", "3"]) == 2
    assert "is at step 4, past the 3 steps of this run" in capsys.readouterr().err
    assert main(args + ["--max-steps", "6", "--beta", "0.2"]) == 2
    assert "belongs to another run (beta 0.1 -> 0.2)" in capsys.readouterr().err
    other = tmp_path / "other.jsonl"
    rows = Path(sentiment_data["train"]).read_text().splitlines()
    other.write_text("\n".join(rows[1:] + rows[:1]) + "\n")  # same pairs, another order: another data set
    assert main(_args(tiny_model_dir, str(other), finished, "--resume", "--max-steps", "6")) == 2
    assert "the data changed" in capsys.readouterr().err
    # a resume that only runs longer is the same run; every step is logged once
    assert main(args + ["--max-steps", "6"]) == 0
    assert [r["step"] for r in read_metrics(finished / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_a_live_lock_is_refused_and_a_stale_one_taken_over(tiny_model_dir, sentiment_data, tmp_path, capsys):
    out = tmp_path / "locked"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        (out / ".dpokit.lock").write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(),
                                                      "started": time.time()}))
        assert main(_args(tiny_model_dir, sentiment_data["train"], out, "--max-steps", "1")) == 2
        assert f"in use by another run (pid {sleeper.pid}" in capsys.readouterr().err
    finally:
        sleeper.kill()
        sleeper.wait()
    assert main(_args(tiny_model_dir, sentiment_data["train"], out, "--max-steps", "1")) == 0  # its pid is gone
    assert "removing the stale lock" in capsys.readouterr().out
    assert not (out / ".dpokit.lock").exists()


def test_files_follow_the_umask(tiny_model_dir, sentiment_data, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "modes"
        assert main(_args(tiny_model_dir, sentiment_data["train"], out, "--max-steps", "1", "--precompute-ref")) == 0
    finally:
        os.umask(old)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" and p.parent.name == "ref_cache" for p in files)
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {"0o644"}


def _launch(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dpokit.cli.main", *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_checkpoints_the_step_and_the_printed_command_resumes_exactly(sig, tiny_model_dir, sentiment_data,
                                                                            tmp_path):
    """SIGINT/SIGTERM mid-run: finish the step, write a checkpoint, exit 75 with the resume command; that
    command finishes the run with the same weights as an uninterrupted one."""
    common = ["--max-steps", "400", "--log-every", "1", "--save-every-minutes", "0"]
    whole = tmp_path / "whole"
    assert main(_args(tiny_model_dir, sentiment_data["train"], whole, *common, "--max-steps", "40")) == 0
    out = tmp_path / "cut"
    args = _args(tiny_model_dir, sentiment_data["train"], out, *common, "--max-steps", "40")
    process = _launch(args)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.05)
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    assert process.returncode == EXIT_INTERRUPTED, err[-2000:]
    assert f"stopped by {sig.name} after step" in err
    command = err.split("resume with: ")[1].splitlines()[0]
    assert command.startswith("dpokit dpo ") and command.endswith("--resume")
    step = int(err.split("after step ")[1].split(";")[0])
    assert (out / f"checkpoint-{step:06d}").is_dir() and 0 < step < 40
    resumed = subprocess.run([sys.executable, "-m", "dpokit.cli.main", *command.split()[1:]], env=ENV,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (out / "final" / "model.safetensors").read_bytes() == (whole / "final" / "model.safetensors").read_bytes()
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, 41))


def _mount_tmpfs(path: Path, size_kib: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(path)],
                          capture_output=True)
    return done.returncode == 0


def test_a_full_disk_is_a_clear_error_and_the_previous_checkpoint_stays_intact(tiny_model_dir, sentiment_data,
                                                                               tmp_path):
    probe = tmp_path / "probe"
    assert main(_args(tiny_model_dir, sentiment_data["train"], probe, "--max-steps", "1", "--no-save-final")) == 0
    checkpoint_kib = sum(p.stat().st_size for p in (probe / "checkpoint-000001").rglob("*") if p.is_file()) // 1024
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, int(checkpoint_kib * 1.6) + 64):  # room for one checkpoint, not two
        pytest.skip("mounting a small tmpfs needs root")
    try:
        out = disk / "run"
        result = subprocess.run([sys.executable, "-m", "dpokit.cli.main",
                                 *_args(tiny_model_dir, sentiment_data["train"], out, "--max-steps", "4",
                                        "--save-every", "1")], env=ENV, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, result.stderr[-2000:]
        assert "no space left on the device" in result.stderr and "Traceback" not in result.stderr
        assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-000001"]
        from dpokit.train.checkpoint import latest_checkpoint

        assert latest_checkpoint(out) == out / "checkpoint-000001"  # intact: its manifest checks out
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
