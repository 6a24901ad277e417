"""A reduced `dpokit demo` on the embedded model: every effect goes in the paper's direction."""

import json

import pytest

from dpokit.experiments.demo import DemoConfig, label_pairs, run_demo

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: extra threads only contend (conftest.py)


def test_label_pairs_forms_every_differently_scored_pair():
    import random

    pairs, ties = label_pairs("p", ["a", "b", "c", "d"], [0.5, -0.2, 0.5, 0.9], DemoConfig(), random.Random(0), "s")
    assert ties == 1  # a and c tie
    assert [(p.chosen, p.rejected) for p in pairs] == [("a", "b"), ("d", "a"), ("c", "b"), ("d", "b"), ("d", "c")]


def test_bradley_terry_labeling_follows_the_score_gap():
    import random

    config = DemoConfig(labeling="bradley-terry", bt_scale=2.0)
    rng = random.Random(0)
    wins = sum(label_pairs("p", ["x", "y"], [0.5, 0.0], config, rng, "s")[0][0].chosen == "x" for _ in range(4000))
    assert wins / 4000 == pytest.approx(1 / (1 + 2.718281828 ** -1.0), abs=0.03)


@pytest.mark.slow
def test_reduced_demo_moves_every_effect_in_the_right_direction(tmp_path):
    config = DemoConfig(output=str(tmp_path / "demo"), sft_reviews=200, sft_steps=5, prompts=48, dpo_steps=40,
                        eval_prompts=48, eval_samples=2, max_new_tokens=24, batch_size=16, lr=5e-4)
    report = run_demo(config, log=lambda *_: None)
    assert report["dpo"]["positive_share"] > report["sft"]["positive_share"] + 0.1
    assert report["dpo"]["mean_score"] > report["sft"]["mean_score"]
    assert report["held_out_reward_accuracy"] > 0.6
    assert report["kl"]["mean"] > 0
    saved = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert len(saved["prompts"]) == len(set(r["prompt"] for r in saved["prompts"])) > 0
    assert not set(r["prompt"] for r in saved["prompts"]) & set(saved["train_prompts"])
    for name in ("training_curves.png", "judge_scores.png", "summary.png"):
        assert (tmp_path / "demo" / name).stat().st_size > 10_000


def test_the_report_gives_the_dpo_models_frontier_point_and_the_command_for_the_frontier():
    from dpokit.experiments.demo import format_report

    report = {"sft": {"mean_score": 0.15, "positive_share": 0.56}, "dpo": {"mean_score": 0.808, "positive_share": 0.97},
              "kl": {"mean": 5.876, "samples": 256}, "held_out_reward_accuracy": 0.865, "held_out_pairs": 643,
              "config": {"beta": 0.1, "examples_shown": 0}, "prompts": []}
    assert ("reward-KL frontier point (β 0.1): reward 0.808 at KL 5.88; the frontier of DPO, PPO and the baselines: "
            "dpokit reproduce sentiment") in format_report(report).splitlines()
