"""examples/vision_dpo.py (docs/vision.md) runs end to end offline: --quick builds its tiny VLM and image pairs,
runs dpokit sft, dpo, generate and eval as subprocesses, and prints the held-out accuracy and answers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "vision_dpo.py"


def test_the_vision_example_runs_quick(tmp_path):
    env = {**os.environ, "DPOKIT_MALLOC": "system"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--output", str(tmp_path), "--quick"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "held-out implicit-reward accuracy (12 pairs)" in out and "DPO against the SFT model:" in out
    assert out.count("after: ") == 6  # an answer for each held-out prompt
    for stage in ("sft", "dpo"):
        assert (tmp_path / stage / "final" / "processor_config.json").exists()
