"""The thread-count rule of dpokit.runtime.threads: CPUs from affinity and cgroup quotas (fake files), explicit settings
respected, the log line, and numbers that do not depend on the thread count."""

from __future__ import annotations

import pytest
import torch

from dpokit.runtime import threads
from dpokit.config import TrainConfig
from dpokit.errors import ConfigError
from dpokit.runtime.threads import (ThreadChoice, _running_elsewhere, apply_threads, available_cpus, cgroup_cpus,
                            choose_threads, explicit_threads, model_width)


@pytest.fixture
def restore_threads(monkeypatch):
    """Put torch's thread count and dpokit's memory of it back after the test."""
    before, state = torch.get_num_threads(), dict(threads._STATE)
    monkeypatch.setitem(threads._STATE, "at_import", before)
    for key in ("applied", "pinned", "logged"):
        monkeypatch.setitem(threads._STATE, key, None)
    yield
    torch.set_num_threads(before)
    threads._STATE.update(state)


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota_of_the_process_own_group(tmp_path):
    _write(tmp_path / "job" / "cpu.max", "150000 100000\n")
    _write(tmp_path / "cpu.max", "max 100000\n")
    assert cgroup_cpus(tmp_path, "0::/job\n") == 1.5


def test_cgroup_v2_without_quota(tmp_path):
    _write(tmp_path / "cpu.max", "max 100000\n")
    assert cgroup_cpus(tmp_path, "0::/\n") is None
    assert cgroup_cpus(tmp_path / "missing", "0::/\n") is None


def test_cgroup_v1_quota_and_no_quota(tmp_path):
    _write(tmp_path / "cpu,cpuacct" / "cpu.cfs_quota_us", "50000\n")
    _write(tmp_path / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpus(tmp_path, "4:memory:/x\n2:cpu,cpuacct:/\n") == 0.5
    _write(tmp_path / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1\n")
    assert cgroup_cpus(tmp_path, "2:cpu,cpuacct:/\n") is None


def test_available_cpus_is_affinity_capped_by_quota_rounded_up(tmp_path, monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    _write(tmp_path / "cpu.max", "150000 100000")
    assert available_cpus(tmp_path, "0::/") == 2
    _write(tmp_path / "cpu.max", "20000 100000")  # a fifth of a CPU still gets one thread
    assert available_cpus(tmp_path, "0::/") == 1
    _write(tmp_path / "cpu.max", "max 100000")
    assert available_cpus(tmp_path, "0::/") == 4


def test_other_processes_running():
    stat = "cpu  1 2 3\nprocs_running 4\nprocs_blocked 0\n"
    assert _running_elsewhere(stat, own_running=1) == 3
    assert _running_elsewhere(stat, own_running=6) == 0
    assert _running_elsewhere("cpu 1 2 3\n", own_running=1) == 0


def test_rule_one_thread_per_free_cpu():
    assert choose_threads(128, cpus=2) == ThreadChoice(2, "2 CPUs available; model width 128")
    assert choose_threads(128, cpus=2, busy=1).threads == 1
    assert choose_threads(None, cpus=4, busy=1) == ThreadChoice(3, "4 CPUs available, 1 busy with other processes")
    assert choose_threads(256, cpus=2, busy=5).threads == 1
    assert choose_threads(None, cpus=1).line() == "threads: 1 (1 CPU available)"


def test_explicit_settings_win(restore_threads, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    assert explicit_threads(3) == ThreadChoice(3, "--threads")
    assert explicit_threads(None) is None
    assert explicit_threads(None, {"OMP_NUM_THREADS": "1"}).reason == "OMP_NUM_THREADS"
    torch.set_num_threads(threads._STATE["at_import"] % 2 + 1)  # a count dpokit did not set
    assert explicit_threads(None).reason == "torch.set_num_threads"


def test_apply_sets_logs_once_and_requested_count_holds(restore_threads, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "available_cpus", lambda *a, **k: 2)
    monkeypatch.setattr(threads, "busy_cpus", lambda *a, **k: 0)
    busy = {"now": 1}
    monkeypatch.setattr(threads, "busy_cpus", lambda *a, **k: busy["now"])
    lines: list[str] = []
    assert apply_threads(width=128, log=lines.append).threads == 1
    assert torch.get_num_threads() == 1
    apply_threads(width=128, log=lines.append)
    assert lines == ["threads: 1 (2 CPUs available, 1 busy with other processes; model width 128)"]
    busy["now"] = 0
    assert apply_threads(log=lines.append).threads == 2  # dpokit's own earlier choice is not the user's
    assert torch.get_num_threads() == 2
    apply_threads(1, log=lines.append)
    assert apply_threads(width=128, log=lines.append) == ThreadChoice(1, "--threads")  # --threads holds
    assert torch.get_num_threads() == 1
    assert lines[1:] == ["threads: 2 (2 CPUs available)", "threads: 1 (--threads)"]


def test_refresh_follows_other_processes_load(restore_threads, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "available_cpus", lambda *a, **k: 2)
    busy = {"now": 0}
    monkeypatch.setattr(threads, "busy_cpus", lambda *a, **k: busy["now"])
    clock = {"now": 1000.0}
    monkeypatch.setattr(threads.time, "monotonic", lambda: clock["now"])
    lines: list[str] = []
    apply_threads(log=lines.append)
    busy["now"] = 1
    threads.refresh_threads(lines.append)  # too soon after the choice: nothing looked at
    assert torch.get_num_threads() == 2
    clock["now"] += threads.RECHECK_SECONDS
    threads.refresh_threads(lines.append)
    assert torch.get_num_threads() == 1
    busy["now"] = 0
    clock["now"] += threads.RECHECK_SECONDS
    threads.refresh_threads(lines.append)
    assert torch.get_num_threads() == 2
    assert lines == ["threads: 2 (2 CPUs available)", "threads: 1 (2 CPUs available, 1 busy with other processes)",
                     "threads: 2 (2 CPUs available)"]
    torch.set_num_threads(1)  # the user's own call from now on
    busy["now"], clock["now"] = 0, clock["now"] + threads.RECHECK_SECONDS
    threads.refresh_threads(lines.append)
    assert torch.get_num_threads() == 1 and len(lines) == 3


def test_environment_and_user_calls_are_left_alone(restore_threads, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(2)
    lines: list[str] = []
    assert apply_threads(width=128, log=lines.append) == ThreadChoice(2, "OMP_NUM_THREADS")
    assert torch.get_num_threads() == 2
    assert lines == ["threads: 2 (OMP_NUM_THREADS)"]


def test_bad_counts_are_config_errors(restore_threads):
    with pytest.raises(ConfigError, match="--threads must be at least 1"):
        apply_threads(0)
    with pytest.raises(ConfigError, match="--threads must be at least 1"):
        TrainConfig(model="m", data="d", output="o", threads=0)


def test_logprobs_do_not_depend_on_the_thread_count(restore_threads):
    from helpers import make_llama

    torch.manual_seed(0)
    model = make_llama(vocab_size=320).eval()
    ids = torch.randint(0, 320, (4, 48))
    results = []
    for count in (1, 2):
        torch.set_num_threads(count)
        with torch.no_grad():
            results.append(model(ids).logits.float().log_softmax(-1))
    assert model_width(model) == model.config.hidden_size
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=0)


def test_cli_threads_reach_torch_and_the_log_stays_off_stdout(restore_threads, tiny_model_dir, capsys, monkeypatch):
    from dpokit.cli.main import main

    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # --threads wins over the environment
    assert main(["generate", "--model", tiny_model_dir, "--prompt", "a", "--max-new-tokens", "2",
                 "--threads", "1", "--jsonl"]) == 0
    out, err = capsys.readouterr()
    assert torch.get_num_threads() == 1
    assert "threads: 1 (--threads)" in err and "threads" not in out
    assert main(["demo", "--threads", "-1"]) == 2
    assert "--threads must be at least 1" in capsys.readouterr().err
