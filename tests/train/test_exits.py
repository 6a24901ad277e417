"""Clean exits of 2-process launches (CPU, gloo): a run that finishes exits 0 with every process shut down (the
process group destroyed, no "terminate called without an active exception" / SIGABRT in any rank, which a ZeRO-3
run of 2 steps with a save at its end was seen to do), and a process that fails ends the launch within seconds,
its error printed once and the other processes' side of it one line each, not a traceback.

The runs are `dpokit dpo` through tests/engine_runs.py --cli, whose ENGINE_RUNS_FAIL_AT hook makes one process fail.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dpokit.train.checkpoint import verify_checkpoint
from engine_runs import CLI, FAIL

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the 2-process checks run on CPU (gloo)")

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cli(engine: str, args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """`accelerate launch` `dpokit ARGS` with configs/accelerate/ENGINE.yaml on 2 CPU processes, in `cwd`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")])),
           **(env or {})}
    env.pop("ACCELERATE_USE_CPU", None)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs" / "accelerate" / f"{engine}.yaml"), "--num_processes", "2",
               "--main_process_port", str(_free_port()), str(ROOT / "tests" / "engine_runs.py"), CLI, *args]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def _dpo(model: str, data: str, output: Path) -> list[str]:
    return ["dpo", "--model", model, "--data", data, "--output", str(output), "--max-steps", "2", "--save-every", "2",
            "--batch-size", "2", "--warmup-steps", "0"]


@pytest.mark.parametrize("engine", ["ddp", "zero3", "zero3"])  # ZeRO-3 twice: its abort came in 1 of 3 to 6 runs
def test_a_finished_run_exits_0_with_every_process_shut_down(engine, tiny_model_dir, sentiment_data, tmp_path):
    result = launch_cli(engine, _dpo(tiny_model_dir, sentiment_data["train"], tmp_path / "run"), tmp_path)
    log = result.stdout[-2000:] + result.stderr[-4000:]
    assert result.returncode == 0, log
    assert "terminate called" not in result.stderr and "SIGABRT" not in result.stderr, log
    assert f"training 2 steps ({engine})" in result.stdout + result.stderr
    assert verify_checkpoint(tmp_path / "run" / "checkpoint-000002") is None
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_a_failing_process_ends_the_launch_with_its_error_printed_once(tiny_model_dir, sentiment_data, tmp_path):
    """Process 1 raises in step 1, while process 0 goes on into the step's collectives: process 0 sees the
    connection close and stops at once, saying so in one line; the launch exits non-zero within seconds."""
    result = launch_cli("ddp", _dpo(tiny_model_dir, sentiment_data["train"], tmp_path / "run"), tmp_path,
                        env={FAIL: "1:1"})
    ended = time.time()
    log = result.stdout[-2000:] + result.stderr[-4000:]
    assert result.returncode != 0, log
    failed = float((tmp_path / "failed-at").read_text())
    assert ended - failed < 30, f"the launch took {ended - failed:.0f} s to end after the failure"
    assert result.stderr.count("the test's failure in step 1 of process 1") == 1, log
    assert "dpokit dpo: error: the test's failure" in result.stderr
    assert "process 0 stopped: another process of the launch failed" in result.stderr, log
    assert "[rank0]: Traceback" not in result.stderr and "[rank1]: Traceback" not in result.stderr, log
    assert "terminate called" not in result.stderr, log
    assert not (tmp_path / "run" / "checkpoint-000002").exists()


def test_only_a_collective_whose_peer_went_away_is_taken_for_another_process_failing(monkeypatch):
    from dpokit.cli.main import _another_process_failed

    gloo = RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:43408")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not _another_process_failed(gloo)  # one process: every error is its own
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert _another_process_failed(gloo)
    assert _another_process_failed(torch.distributed.DistBackendError("NCCL communicator was aborted"))
    assert not _another_process_failed(ValueError("a bug of this process"))
