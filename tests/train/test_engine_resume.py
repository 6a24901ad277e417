"""Exact resume under the sharding engines, 2 CPU processes (gloo), through tests/engine_runs.py.

ZeRO-2 and ZeRO-3: 2 steps, then --resume to 4, equals 4 uninterrupted steps (DeepSpeed's own checkpoint of its
optimizer partitions, inside dpokit's atomic checkpoint). ZeRO-3 and FSDP2: a launch SIGKILLed while its processes
are writing the checkpoint of step 4 leaves checkpoint 2 intact and no checkpoint 4; --resume then ends with the
weights of the uninterrupted run. Every comparison is within 1e-6, and every launch that is not killed exits 0.
A DeepSpeed checkpoint resumes only on its ZeRO stage and process count.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpokit.train.checkpoint import checkpoints, verify_checkpoint
from dpokit.train.metrics import read_metrics
from engine_runs import PAUSE, RESUME, SUFFIX

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.skipif(torch.cuda.is_available(), reason="the 2-process engine checks run on CPU (gloo)"),
              pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")]

ROOT = Path(__file__).resolve().parents[2]
WHOLE, RESUMED, KILLED = "dpo4", "dpo4" + SUFFIX, "dpo4-killed"
# per engine: whether a launch is killed in the save of step 4 (and how many processes reach the fault point),
# and the runs of the launch that then checks them all against the uninterrupted one
PLANS = {"zero2": (0, [WHOLE, RESUMED]),
         "zero3": (2, [RESUME + KILLED, WHOLE, RESUMED]),
         "fsdp2": (1, [RESUME + KILLED, WHOLE])}


def _command(engine: str, output: Path, model: str, data: dict, runs: list[str]) -> list[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "configs" / "accelerate" / f"{engine}.yaml"), "--num_processes", "2",
            "--main_process_port", str(port), str(ROOT / "tests" / "engine_runs.py"), str(output), model,
            data["train"], data["eval"], *runs]


def _env(**extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")])), **extra}
    env.pop("ACCELERATE_USE_CPU", None)
    return env


def _kill_in_save(engine: str, output: Path, model: str, data: dict, paused: int) -> None:
    """Launch the killed run, wait until `paused` processes stand at their fault point inside the save of step 4,
    SIGKILL the whole launch (launcher and processes)."""
    log = output / "killed.log"
    with log.open("w") as handle:
        process = subprocess.Popen(_command(engine, output, model, data, [KILLED]), env=_env(**{PAUSE: "4"}),
                                   stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    try:
        while len(list(output.glob("paused-rank*"))) < paused:
            assert process.poll() is None, f"the run ended before its fault point:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, "the run did not reach its fault point"
            time.sleep(0.05)
    finally:  # the processes first (torch's launcher starts each in a session of its own), then the launcher
        pids = [int(path.read_text()) for path in output.glob("pid-rank*")]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        while any(_alive(pid) for pid in pids):
            time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


@pytest.mark.parametrize("engine", list(PLANS))
def test_resume_under_the_engine_equals_the_uninterrupted_run(engine, tiny_model_dir, sentiment_data, tmp_path):
    paused, runs = PLANS[engine]
    killed = tmp_path / KILLED
    if paused:
        _kill_in_save(engine, tmp_path, tiny_model_dir, sentiment_data, paused)
        assert [p.name for p in checkpoints(killed)] == ["checkpoint-000002"]  # and no checkpoint 4
        assert verify_checkpoint(killed / "checkpoint-000002") is None
        assert list(killed.glob("checkpoint-000004*.tmp")), "the kill did not land inside the save"
    result = subprocess.run(_command(engine, tmp_path, tiny_model_dir, sentiment_data, runs), env=_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    log = result.stdout + result.stderr
    assert f"training 4 steps ({engine})" in log, "the launcher config did not select the engine"
    whole = _weights(tmp_path / WHOLE)
    start = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    assert max((whole[k] - start[k]).abs().max().item() for k in whole) > 1e-4  # training did move them
    for name in (r.removeprefix(RESUME) for r in runs if r != WHOLE):
        assert f"resumed from {tmp_path / name / 'checkpoint-000002'} at step 2" in log, name
        weights = _weights(tmp_path / name)
        worst = max((whole[k] - weights[k]).abs().max().item() for k in whole)
        print(f"{engine} {name}: max weight difference to the uninterrupted run {worst:.3g}")
        assert worst <= 1e-6, f"{engine} {name}: weights differ by {worst}"
        rows, expected = (read_metrics(tmp_path / run / "metrics.jsonl") for run in (name, WHOLE))
        assert [r["step"] for r in rows] == [r["step"] for r in expected] == [1, 2, 3, 4], name
        assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in expected], abs=1e-6), name
    if paused:  # the resumed run wrote checkpoint 4 again, over what the kill left
        assert not list(killed.glob("*.tmp")) and verify_checkpoint(killed / "checkpoint-000004") is None


@pytest.mark.parametrize("saved, now, refused", [
    ({"engine": "zero2", "processes": 2}, ("zero2", 2), False),
    ({"engine": "zero2", "processes": 2}, ("zero3", 2), True),  # another stage: other partitions
    ({"engine": "zero3", "processes": 2}, ("zero3", 4), True),  # another process count
    ({"engine": "zero3", "processes": 2}, ("fsdp2", 2), True),  # the optimizer state is DeepSpeed's only
    ({}, ("zero2", 2), True),  # a DDP/FSDP2 checkpoint holds the whole optimizer state, not partitions
    ({}, ("fsdp2", 4), False),
])
def test_deepspeed_partitions_resume_only_on_their_engine_and_processes(saved, now, refused, tmp_path):
    from dpokit.errors import ConfigError
    from dpokit.train.checkpoint import check_resumable

    (tmp_path / "trainer_state.json").write_text(json.dumps({"step": 2, "resumable": True, **saved}))
    engine, processes = now
    if refused:
        with pytest.raises(ConfigError, match="DeepSpeed resumes only from its own partitions"):
            check_resumable(tmp_path, {}, engine, processes=processes)
    else:
        check_resumable(tmp_path, {}, engine, processes=processes)
