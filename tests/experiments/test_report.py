"""The demo's plots: every PNG is written from a report and metrics rows; the smoothing and the accuracy rule the
plots rely on, on hand cases."""

import json
import math

import pytest
import torch

from dpokit.losses.dispatch import LossConfig, preference_loss, preference_metrics
from dpokit.experiments.report import _points, plot_report, smooth


def test_smooth_is_a_debiased_moving_average():
    # weight 0.5: avg_1 = 0.5·1 = 0.5 -> 0.5/(1-0.5) = 1; avg_2 = 0.25 + 0 -> 0.25/(1-0.25) = 1/3;
    # avg_3 = 0.125 + 0.5·4 = 2.125 -> 2.125/(1-0.125) = 17/7
    assert smooth([1.0, 0.0, 4.0], weight=0.5) == pytest.approx([1.0, 1 / 3, 17 / 7])
    assert smooth([2.0] * 5, weight=0.9) == pytest.approx([2.0] * 5)  # no pull towards 0 at the start
    assert smooth([3.0, 1.0], weight=0.0) == [3.0, 1.0]
    assert smooth([]) == []


def test_ties_count_as_wrong_as_the_accuracy_note_says():
    # at step 1 of DPO the policy is the reference: every margin is 0, so accuracy is 0 (not 0.5) and the
    # loss is ln 2; a pair the policy already prefers counts once it is strictly ahead
    pc, pr = torch.tensor([-3.0, -4.0, -2.0]), torch.tensor([-5.0, -4.0, -2.0])
    out = preference_loss(pc, pr, pc.clone(), pr.clone(), LossConfig(beta=0.1))
    assert preference_metrics(out, pc, pr)["rewards/accuracies"].tolist() == [0.0, 0.0, 0.0]
    assert out.losses.tolist() == pytest.approx([math.log(2)] * 3)
    moved = preference_loss(pc + torch.tensor([1e-3, 0.0, -1e-3]), pr, pc, pr, LossConfig(beta=0.1))
    assert preference_metrics(moved, pc, pr)["rewards/accuracies"].tolist() == [1.0, 0.0, 0.0]


def _write_rows(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_plot_report_writes_every_png(tmp_path):
    train = [{"split": "train", "step": s, "loss": 0.69 - 0.002 * s, "rewards/accuracies": min(1.0, s / 40),
              "rewards/chosen": 0.01 * s, "rewards/rejected": -0.02 * s, "rewards/margins": 0.03 * s}
             for s in range(1, 51)]
    evals = [{"split": "eval", "step": s, "loss": 0.6, "rewards/accuracies": 0.7} for s in (25, 50)]
    _write_rows(tmp_path / "dpo" / "metrics.jsonl", train + evals + [{"split": "train", "step": 51, "loss": float("nan")}])
    _write_rows(tmp_path / "sft" / "metrics.jsonl", [{"split": "train", "step": s, "loss": 2.0 / s} for s in (1, 2, 3)])
    sft, dpo = [-0.6, 0.1, 0.3, -0.9], [0.7, 0.9, 0.2, 0.95]
    report = {"sft_scores": sft, "dpo_scores": dpo,
              "sft": {"mean_score": sum(sft) / 4, "positive_share": 0.5},
              "dpo": {"mean_score": sum(dpo) / 4, "positive_share": 1.0},
              "kl": {"mean": 3.2}, "held_out_reward_accuracy": 0.8, "held_out_pairs": 10,
              "config": {"judge": "vader", "dpo_steps": 50}}
    paths = plot_report(tmp_path, report)
    assert [p.name for p in paths] == ["training_curves.png", "judge_scores.png", "summary.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    # the eval rows are what the held-out curve draws; the NaN row is left out
    rows = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert _points(rows, "eval", "rewards/accuracies") == ([25, 50], [0.7, 0.7])
    assert _points(rows, "train", "loss")[0][-1] == 50
