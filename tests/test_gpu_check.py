"""bench/gpu_check.sh --dry-run: the GPU smoke test's sequence (the FlexAttention exactness stage, FSDP2, ZeRO-3,
LoRA, TRL beside them) on CPU with a tiny model, so the script is known to work before a GPU is lent."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_every_part_on_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    # every run but trl-full and dpokit-qlora, whose children are trl-lora's and dpokit-lora's with other options
    # (QLoRA itself is tested in tests/models/test_lora.py): the suite's time budget
    runs = "dpokit-full,dpokit-fsdp2,dpokit-zero3,dpokit-lora,trl-lora"
    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--workdir", str(tmp_path),
                             "--runs", runs],
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = result.stdout.split("gpu_check summary")[1]
    for run, engine in (("dpokit-full", "single"), ("dpokit-fsdp2", "fsdp2"), ("dpokit-zero3", "zero3"),
                        ("dpokit-lora", "single"), ("trl-lora", "trl")):
        assert f"| {run} | ok | {engine} |" in summary, summary
    assert "exactness     ok     packed+FlexAttention vs plain+SDPA, float32" in result.stdout  # forward
    assert "exactness     ok     packed+FlexAttention vs plain+SDPA as a Mistral with a 24-token window" in result.stdout
    assert json.loads((tmp_path / "result_exactness.json").read_text())["pairs_past_window"] > 0
    assert "gpu_check passed" in result.stdout
