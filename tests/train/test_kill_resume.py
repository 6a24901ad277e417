"""Kill anywhere, resume exactly: SIGKILL at 10 seeded moments of a run (loading, the reference pass and its cache
write, training steps, evaluation, checkpoint writes), then --resume: the same final weights, byte for byte, and
the same metrics rows as the uninterrupted run. scripts/kill_resume.py runs more kill points (the stress run)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from kill_resume import run_kill_points  # noqa: E402


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_a_run_killed_at_random_moments_resumes_to_the_same_result(tiny_model_dir, sentiment_data, tmp_path):
    eval_path = tmp_path / "eval.jsonl"
    eval_path.write_text("".join(Path(sentiment_data["eval"]).read_text().splitlines(keepends=True)[:15]))
    results = run_kill_points(tiny_model_dir, sentiment_data["train"], str(eval_path), tmp_path, kills=10, seed=0)
    assert sum(r["killed"] for r in results) >= 8, results  # the kill points really fell inside the run
    assert [r for r in results if r["problems"]] == []
