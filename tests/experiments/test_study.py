"""The dpo-vs-ppo study (dpokit.experiments.paper.study, budget, optimum, study_report): the optimum's closed form
on hand values, and a micro study on the tiny test model writing study.json, report.md and the figures."""

import json
import math
from dataclasses import replace

import pytest
import torch

from dpokit.experiments.paper.optimum import optimum_summary

pytestmark = pytest.mark.usefixtures("single_thread")


def test_the_optimum_by_importance_weights_matches_the_closed_form():
    rewards = torch.tensor([[1.0, 0.0]])
    summary = optimum_summary(rewards, rewards, beta=1.0)
    w = math.e / (math.e + 1)  # π*(y_1) ∝ π_ref(y_1)·e^{1/β}, π_ref uniform over the two samples
    assert summary["kl"] == pytest.approx(w * math.log(2 * w) + (1 - w) * math.log(2 * (1 - w)))
    assert summary["reward"] == pytest.approx(w)
    assert summary["effective_samples"] == pytest.approx(1 / (w ** 2 + (1 - w) ** 2))
    # β → ∞: π* = π_ref (KL 0, π_ref's mean reward); β → 0: all weight on the best sample (KL log M); ties share it
    assert optimum_summary(rewards, rewards, 1e9)["kl"] == pytest.approx(0.0, abs=1e-9)
    cold = optimum_summary(torch.tensor([[1.0, 0, 0, 0], [0.0, 0, 0, 0]]), torch.zeros(2, 4), 1e-6)
    assert cold["kl"] == pytest.approx((math.log(4) + 0.0) / 2) and cold["kl_cap"] == pytest.approx(math.log(4))


@pytest.mark.slow
def test_micro_study_writes_its_report(tiny_model_dir, tmp_path):
    from dpokit.experiments.paper.study import STUDY_SIZES, run_study

    tiny = STUDY_SIZES["tiny"]
    # the random tiny model writes no sentiment for VADER to tell apart: the judge is the text's length
    task = replace(tiny.task, demo=replace(tiny.task.demo, model=tiny_model_dir, judge="builtins:len"))
    study = run_study(str(tmp_path / "out"), replace(tiny, task=task), threads=1, log=lambda *_: None)
    saved = json.loads((tmp_path / "out" / "study.json").read_text())
    assert saved["points"] == study["points"]
    methods = {p["method"] for p in saved["points"]}
    assert methods == {"dpo", "ppo", "ppo-gt", "dpo-online", "dpo-online-gt", "optimum-rm", "optimum-gt"}
    dpo = [p for p in saved["points"] if p["method"] == "dpo"]
    # today's β with 2 seeds, the other budget's β with one: each run has exactly one converged point
    runs = {(p["knob"]["budget"], p["knob"]["beta"], p["knob"]["seed"]) for p in dpo}
    assert runs == {(1.0, 0.5, 0), (1.0, 0.5, 1), (0.5, 0.5, 0)}
    for run in runs:
        mine = [p for p in dpo if (p["knob"]["budget"], p["knob"]["beta"], p["knob"]["seed"]) == run]
        assert sum(p["converged"] for p in mine) == 1 and all(p["knob"]["step"] <= p["stopped_at"] for p in mine)
    ppo = [p for p in saved["points"] if p["method"] == "ppo"]
    assert {(p["knob"]["budget"], p["knob"]["seed"]) for p in ppo} == {(1.0, 0), (1.0, 1), (0.5, 0)}
    assert set(saved["pairs"]) == {"0.5", "1"} and saved["pairs"]["0.5"] < saved["pairs"]["1"]
    # each budget's reward model is its own, fitted to its pairs
    assert (tmp_path / "out" / "reward_model" / "final").is_dir()
    assert (tmp_path / "out" / "budget-0.5" / "reward_model" / "final").is_dir()
    report = (tmp_path / "out" / "report.md").read_text()
    for heading in ("## Frontier statistics", "## The data-budget sweep", "## β sensitivity", "## Sample budgets"):
        assert heading in report
    assert saved["bands"] and all(b["pairs"] for b in saved["bands"])
    for figure in ("frontier_hulls.png", "study_beta.png"):
        assert (tmp_path / "out" / figure).stat().st_size > 5_000
    # measured checkpoints keep their weights (for more samples), not their optimizer state; the others go
    kept = list((tmp_path / "out").glob("**/dpo/*/checkpoint-*"))
    assert sorted(str(k) for k in kept) == sorted(p["model"] for p in dpo)
    assert not [f for k in kept for f in k.glob("trainer_state*")]
    # the points near a frontier were measured further, up to the cap (8 samples: the tiny sizes' 4 held-out
    # samples cannot reach a standard error of 0.001 on lengths)
    today = saved["precision"]["1"]
    assert today["topped_up"] > 0 and today["samples_added"] > 0 and today["left_over"]
    extended = [p for p in saved["points"] if p.get("samples", 0) > 4]
    assert extended and all(p["samples"] == 8 == len(p["scores"]) == len(p["kls"]) for p in extended)
    assert saved["reference"]["samples"] == 8
    assert "## Standard errors" in report


def test_the_study_takes_no_methods(capsys):
    from dpokit.cli.main import main

    assert main(["reproduce", "dpo-vs-ppo", "--output", "x", "--methods", "dpo"]) == 2
    assert "--methods applies to `reproduce sentiment`" in capsys.readouterr().err


def test_samples_needed_for_a_standard_error():
    from dpokit.experiments.paper.precision import needed

    assert needed({"samples": 512, "reward_se": 0.02}, 0.01) == 2048  # s.e. ∝ 1/√n
    assert needed({"samples": 512, "reward_se": 0.005}, 0.01) == 512  # already within it
