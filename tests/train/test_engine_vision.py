"""Vision-language DPO across a resume and under the engines (docs/vision.md, Engines and resume), on
tests/vlm_helpers.py's tiny LLaVA (a CLIP vision tower, frozen, a projector and a Llama) with image pairs:

* a checkpoint's weights load back into a VLM (transformers saves them under the Hub checkpoints' names), LLaVA
  and Qwen2-VL;
* one process: 2 steps with a checkpoint, then --resume to 4, gives the weights (bit for bit) and metrics of 4
  uninterrupted steps, the vision tower the starting one throughout; with a LoRA adapter too;
* 2 CPU processes (gloo; `accelerate launch` with configs/accelerate/ENGINE.yaml, tests/engine_runs_vision.py) under
  DDP, FSDP2 and ZeRO-3 give the weights and metrics of one process at the same global batch (float32, within 1e-5
  as text in tests/train/test_engine.py), the vision tower unchanged; under FSDP2 also 2 steps then --resume to 4,
  under ZeRO-3 also LoRA.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpokit.api import train_dpo
from dpokit.config import TrainConfig
from dpokit.train.metrics import read_metrics
from engine_runs_vision import SUFFIX, options, resumed
from vlm_helpers import COLOURS, make_llava, make_qwen2_vl, shape_image

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.skipif(torch.cuda.is_available(), reason="the 2-process engine checks run on CPU (gloo)")]

ROOT = Path(__file__).resolve().parents[2]
TOWER = "vision_tower."
# per engine, the runs of its launch (a "-resumed" run must equal the uninterrupted one of one process)
ENGINES = {"ddp": ["vlm"], "fsdp2": ["vlm", "vlm4" + SUFFIX], "zero3": ["vlm", "lora4"]}
METRICS = ("loss", "rewards/margins", "rewards/accuracies", "grad_norm", "lr")


def _rows(n: int) -> list[dict]:
    """Pairs about coloured shapes: one or two images per prompt, questions and answers of different lengths."""
    colours = list(COLOURS)
    rows = []
    for i in range(n):
        images = [f"shape{i}.png"] + ([f"shape{i}b.png"] if i % 3 == 0 else [])
        parts = [{"type": "image"} for _ in images] + [{"type": "text", "text": "what colour is it" + " now" * (i % 3)}]
        rows.append({"images": images, "prompt": [{"role": "user", "content": parts}],
                     "chosen": f"the shape is {colours[i % 4]}",
                     "rejected": f"it is {colours[(i + 1) % 4]} and round" * (1 + i % 2)})
    return rows


@pytest.fixture(scope="module")
def vlm(tmp_path_factory) -> dict:
    """The tiny LLaVA, 8 training pairs and 5 held-out ones (an odd count: the processes score different numbers)."""
    root = tmp_path_factory.mktemp("vlm-engines")
    rows = _rows(8)
    for i, row in enumerate(rows):
        for j, name in enumerate(row["images"]):
            shape_image(list(COLOURS)[(i + j) % 4], "square" if (i + j) % 2 else "circle").save(root / name)
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:5]))
    return {"model": make_llava(root / "llava", seed=1), "train": str(root / "train.jsonl"),
            "eval": str(root / "eval.jsonl")}


@pytest.fixture(scope="module")
def one_process(vlm, tmp_path_factory):
    """Each run in this process at the launches' global batch (lazily: only the runs a test asks for)."""
    root = tmp_path_factory.mktemp("vlm-one-process")
    done: dict[str, Path] = {}

    def run(name: str) -> Path:
        if name not in done:
            values = options(name.removesuffix(SUFFIX), vlm["model"], vlm["train"], vlm["eval"], str(root / name), 1)
            if name.endswith(SUFFIX):
                resumed(values)
            else:
                train_dpo(TrainConfig(**values))
            done[name] = root / name
        return done[name]

    return run


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    adapter = directory / "adapter_model.safetensors"
    return load_file(str(adapter if adapter.exists() else directory / "model.safetensors"))


def _assert_tower_unchanged(start: dict, weights: dict, where: str) -> None:
    tower = [k for k in start if k.startswith(TOWER)]
    assert tower, sorted(start)[:5]
    assert all(torch.equal(start[k], weights[k]) for k in tower), f"{where}: the frozen vision tower changed"
    assert max((start[k] - weights[k]).abs().max().item() for k in start) > 1e-4, f"{where}: nothing trained"


@pytest.mark.parametrize("make", [make_llava, make_qwen2_vl])
def test_a_checkpoint_of_a_vlm_loads_back_into_it(make, tmp_path):
    """transformers saves a VLM under the Hub checkpoints' names (LLaVA's model.language_model.* as
    language_model.model.*): the weights of a saved model load into another one with every value in place."""
    from dpokit.models.loading import load_model
    from dpokit.train.checkpoint import load_model_weights

    saved, other = (load_model(make(tmp_path / name, seed=seed)) for name, seed in (("saved", 1), ("other", 2)))
    saved.save_pretrained(tmp_path / "checkpoint")
    assert set(load_file(str(tmp_path / "checkpoint" / "model.safetensors"))) != set(saved.state_dict())
    load_model_weights(other, tmp_path / "checkpoint")
    expected, loaded = saved.state_dict(), other.state_dict()
    assert expected.keys() == loaded.keys()
    assert all(torch.equal(expected[k], loaded[k]) for k in expected)


@pytest.mark.parametrize("run", ["vlm4", "lora4"])
def test_a_resumed_vlm_run_equals_the_uninterrupted_run(run, vlm, one_process):
    """2 steps and checkpoint 2, then --resume to 4: the weights of 4 uninterrupted steps bit for bit, the same
    metrics; the frozen vision tower is the starting one in the checkpoint and at the end (a LoRA adapter holds
    none of it)."""
    whole, cut = one_process(run), one_process(run + SUFFIX)
    assert (cut / "checkpoint-000002").is_dir() and (cut / "checkpoint-000004").is_dir()
    a, b = _weights(whole / "final"), _weights(cut / "final")
    assert a and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), max((a[k] - b[k]).abs().max().item() for k in a)
    if run == "lora4":
        assert not any("vision_tower" in k for k in a), sorted(a)[:5]
    else:
        start = _weights(Path(vlm["model"]))
        for where in (cut / "checkpoint-000002", cut / "final"):
            _assert_tower_unchanged(start, _weights(where), str(where))
    rows_a, rows_b = read_metrics(whole / "metrics.jsonl"), read_metrics(cut / "metrics.jsonl")
    assert [r["step"] for r in rows_b] == [r["step"] for r in rows_a] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows_b] == pytest.approx([r["loss"] for r in rows_a], abs=1e-6)
    assert rows_a[-1]["loss"] < rows_a[0]["loss"]  # it trained


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(engine: str, output: Path, vlm: dict, runs: list[str]) -> str:
    """`accelerate launch` the runs with configs/accelerate/ENGINE.yaml on 2 CPU processes; return the log."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))}
    env.pop("ACCELERATE_USE_CPU", None)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs" / "accelerate" / f"{engine}.yaml"), "--num_processes", "2",
               "--main_process_port", str(_free_port()), str(ROOT / "tests" / "engine_runs_vision.py"), str(output),
               vlm["model"], vlm["train"], vlm["eval"], *runs]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout + result.stderr


@pytest.mark.parametrize("engine", list(ENGINES))
def test_two_processes_under_the_engine_equal_one_process_on_a_vlm(engine, vlm, one_process, tmp_path):
    log = _launch(engine, tmp_path, vlm, ENGINES[engine])
    assert f"training 2 steps ({engine})" in log, "the launcher config did not select the engine"
    assert "2 x 2 accumulation x 2 processes" in log
    start = _weights(Path(vlm["model"]))
    for name in ENGINES[engine]:
        one, two = one_process(name.removesuffix(SUFFIX)), tmp_path / name
        a, b = _weights(one / "final"), _weights(two / "final")
        assert a.keys() == b.keys()
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        print(f"{engine} {name}: max weight difference to one process {worst:.3g}")
        assert worst <= 1e-5, f"{engine} {name}: weights differ by {worst}"
        if name.startswith("lora"):  # an adapter on the language model only
            assert not any("vision_tower" in k for k in b), sorted(b)[:5]
        else:
            _assert_tower_unchanged(start, b, f"{engine} {name}")
        rows_a, rows_b = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
        assert [(r["split"], r["step"]) for r in rows_a] == [(r["split"], r["step"]) for r in rows_b]
        for ra, rb in zip(rows_a, rows_b):
            for key in (k for k in METRICS if k in ra):
                assert ra[key] == pytest.approx(rb[key], abs=1e-5, rel=1e-5), (engine, name, ra["step"], key)
        if name.endswith(SUFFIX):
            assert f"resumed from {two / 'checkpoint-000002'} at step 2" in log
