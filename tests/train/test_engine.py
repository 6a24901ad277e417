"""The engines (DDP, FSDP2, DeepSpeed ZeRO-2/3), each with 2 CPU processes (gloo), give the update of one process.

For each engine one `accelerate launch` with its shipped config (configs/accelerate/*.yaml) trains: DPO with the
reference resident (also offloaded), DPO with reference log-probs precomputed by a sharded pass, SFT, LoRA DPO
and DPO interrupted after checkpoint 2 and resumed, each at batch 2 x accumulation 2 x 2 processes; the same runs
in this process at batch 8 x 1 must give the same weights after 3 steps (float32, 1e-5) and the same train and
eval metrics. Under DDP also DPO with --streaming (shards written by the first process only, into a fresh cache
entry or a temporary one, and resumed from the cache), which must equal the in-memory run of both launches; and
DPO launched as two nodes of one process each (--num_machines 2, rendezvous on 127.0.0.1), as on a cluster.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpokit.train.metrics import read_metrics
from engine_runs import RESUMED, RUNS, SAME_AS, STREAMING_RESUMED, SUFFIX, common

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.skipif(torch.cuda.is_available(), reason="the 2-process engine checks run on CPU (gloo)")]

ROOT = Path(__file__).resolve().parents[2]
STREAMED = ["dpo-streaming", "dpo-streaming-uncached", STREAMING_RESUMED]
ENGINES = {"ddp": ["dpo", "dpo-precompute", "sft", "lora", RESUMED, "dpo-sync-ref", *STREAMED],
           "fsdp2": ["dpo", "dpo-precompute", "sft", "lora", "dpo-ref-offload", RESUMED, "dpo-sync-ref",
                     "dpo-sync-ref" + SUFFIX],
           "zero2": ["dpo", "dpo-precompute"],
           "zero3": ["dpo", "dpo-precompute", "lora", "dpo-ref-offload"]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu",
           # the tests' helpers, and whatever dpokit this process imports (a worktree's src/ on PYTHONPATH)
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))}
    env.pop("ACCELERATE_USE_CPU", None)
    return env


def _launch_command(engine: str, launcher: list[str], output: Path, model: str, data: dict, runs: list[str]):
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "configs" / "accelerate" / f"{engine}.yaml"), *launcher, str(ROOT / "tests" / "engine_runs.py"),
            str(output), model, data["train"], data["eval"], *runs]


def launch_engine(engine: str, output: Path, model: str, data: dict, runs: list[str]) -> str:
    """`accelerate launch` the runs with configs/accelerate/ENGINE.yaml on 2 CPU processes; return the log."""
    launcher = ["--num_processes", "2", "--main_process_port", str(_free_port())]
    result = subprocess.run(_launch_command(engine, launcher, output, model, data, runs), env=_launch_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout + result.stderr


def launch_two_nodes(output: Path, model: str, data: dict, runs: list[str]) -> list[str]:
    """Two `accelerate launch` commands, as on two nodes of one process each (--num_machines 2, --machine_rank
    0 and 1, rendezvous at 127.0.0.1 on a free port) with configs/accelerate/ddp.yaml; return their logs."""
    port = str(_free_port())
    launches = []
    for rank in (0, 1):
        launcher = ["--num_machines", "2", "--machine_rank", str(rank), "--num_processes", "2",
                    "--main_process_ip", "127.0.0.1", "--main_process_port", port]
        launches.append(subprocess.Popen(_launch_command("ddp", launcher, output, model, data, runs),
                                         env=_launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         text=True))
    try:
        logs = [launch.communicate(timeout=300)[0] for launch in launches]
    finally:
        for launch in launches:
            if launch.poll() is None:
                launch.kill()
    for rank, (launch, log) in enumerate(zip(launches, logs)):
        assert launch.returncode == 0, f"node {rank}: " + log[-4000:]
    return logs


@pytest.fixture(scope="module")
def data(sentiment_data, tmp_path_factory):
    """The training set, and an odd-sized held-out set so the processes evaluate different counts."""
    path = tmp_path_factory.mktemp("engine-data") / "eval.jsonl"
    path.write_text("".join(Path(sentiment_data["eval"]).read_text().splitlines(keepends=True)[:15]))
    return {"train": sentiment_data["train"], "eval": str(path)}


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, data, tmp_path_factory):
    """Every run once, in this process, at batch 8 x 1 (lazily: only the runs a test asks for)."""
    root = tmp_path_factory.mktemp("one-process")
    done: dict[str, Path] = {}

    def run(name: str) -> Path:
        if name.endswith(SUFFIX):  # a resumed run must equal the uninterrupted one
            name = name[:-len(SUFFIX)]
        name = SAME_AS.get(name, name)  # and a streamed one the in-memory one
        if name not in done:
            stage, options = RUNS[name]
            values = {**common(tiny_model_dir, data["train"], data["eval"], str(root / name)), **options,
                      "batch_size": 8, "grad_accum": 1}
            from dpokit.config import TrainConfig

            stage(TrainConfig(**values))
            done[name] = root / name
        return done[name]

    return run


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    final = run / "final"
    name = "adapter_model.safetensors" if (final / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(str(final / name))


@pytest.mark.parametrize("engine", list(ENGINES))
def test_two_processes_under_the_engine_equal_one_process(engine, tiny_model_dir, data, one_process, tmp_path):
    log = launch_engine(engine, tmp_path, tiny_model_dir, data, ENGINES[engine])
    assert f"training 3 steps ({engine})" in log, "the launcher config did not select the engine"
    assert "2 x 2 accumulation x 2 processes" in log
    for name in ENGINES[engine]:
        one, two = one_process(name), tmp_path / name
        a, b = _final_weights(one), _final_weights(two)
        assert a.keys() == b.keys()
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst <= 1e-5, f"{engine} {name}: weights differ by {worst}"
        if name != "lora":
            start = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
            assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-4  # training did move them
        rows_a, rows_b = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
        assert [(r["split"], r["step"]) for r in rows_a] == [(r["split"], r["step"]) for r in rows_b]
        for ra, rb in zip(rows_a, rows_b):
            for key in ("loss", "rewards/margins", "rewards/accuracies", "grad_norm", "lr"):
                if key in ra:
                    assert ra[key] == pytest.approx(rb[key], abs=1e-5, rel=1e-5), (engine, name, ra["step"], key)
        if name == "dpo-sync-ref":  # the moving reference changed the run (the same on every process)
            plain = _final_weights(one_process("dpo"))
            assert max((a[k] - plain[k]).abs().max().item() for k in a) > 1e-6
        if name == "dpo-precompute":
            assert list((two / "ref_cache").glob("*.safetensors")), "the sharded pass wrote no cache"
        if name in STREAMED:  # the same weights as the in-memory run of this launch, too
            memory = _final_weights(tmp_path / "dpo")
            assert max((memory[k] - b[k]).abs().max().item() for k in b) <= 1e-5, name
    if engine == "ddp":  # the first process wrote the shards of each streamed run (the resume reused them)
        writers = [int((tmp_path / f"writers-rank{rank}.txt").read_text()) for rank in (0, 1)]
        assert writers == [len(STREAMED), 0]


def test_two_nodes_of_one_process_equal_one_process(tiny_model_dir, data, one_process, tmp_path):
    """Multi-node for real on one machine: two launches (--num_machines 2, --machine_rank 0/1, rendezvous on
    127.0.0.1) of one process each, batch 2 x accumulation 2 x 2 nodes, give one process's weights at batch 8."""
    logs = launch_two_nodes(tmp_path, tiny_model_dir, data, ["dpo"])
    assert "2 x 2 accumulation x 2 processes" in logs[0]
    a, b = _final_weights(one_process("dpo")), _final_weights(tmp_path / "dpo")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"two nodes vs one process: max weight difference {worst:.3g}")
    assert worst <= 1e-5, f"two nodes: weights differ by {worst}"
    rows_a, rows_b = read_metrics(one_process("dpo") / "metrics.jsonl"), read_metrics(tmp_path / "dpo" / "metrics.jsonl")
    assert [(r["split"], r["step"]) for r in rows_a] == [(r["split"], r["step"]) for r in rows_b]
    assert [r["loss"] for r in rows_b] == pytest.approx([r["loss"] for r in rows_a], abs=1e-5)


def test_accelerate_launch_cpu_with_several_processes_is_a_clear_error(tiny_model_dir, data, tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts one process (its CPU launcher needs mpirun): dpokit says
    so and how to launch instead, rather than silently training alone."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs" / "accelerate" / "fsdp2.yaml"), "--num_processes", "2", "--cpu",
               "--main_process_port", str(_free_port()), "-m", "dpokit.cli.main", "dpo", "--model", tiny_model_dir,
               "--data", data["train"], "--output", str(tmp_path / "x"), "--max-steps", "1"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "leave out --cpu" in result.stderr and "Traceback" not in result.stderr.split("dpokit dpo: error")[0][-200:]
    assert not (tmp_path / "x" / "metrics.jsonl").exists()
