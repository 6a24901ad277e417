"""Plots of a demo run, as PNG files beside report.json.

* ``training_curves.png``: SFT loss, DPO loss, reward accuracy and implicit rewards against the step. Each
  training curve is drawn faint as logged (one micro-batch step: noisy) under a smoothed line
  (:func:`smooth`); held-out rows of metrics.jsonl (``"split": "eval"``) are drawn as points, and the demo's
  final held-out reward accuracy (report.json) as a marked point at the last step.
* ``judge_scores.png``: the judge's score distributions of SFT and DPO continuations of the held-out prompts,
  with the threshold above which a continuation counts as positive.
* ``summary.png``: the result at a glance: the score distributions, the reward–KL point of the DPO model
  against the SFT model it started from, and positive share and held-out reward accuracy against chance.

:func:`plot_rounds` plots a `dpokit iterate` run: judge score and KL from the starting policy per round.
"""

from __future__ import annotations

import math
from pathlib import Path

from dpokit.judges.pointwise import POSITIVE_THRESHOLD
from dpokit.train.metrics import read_metrics

ACCURACY_NOTE = ("ties count as wrong (as in TRL): at step 1 π = π_ref,\n"
                 "every margin is 0, so accuracy starts near 0, not 0.5")
"""Why the training reward accuracy starts near 0: ``rewards/accuracies`` is the share of pairs whose chosen
reward is strictly larger (:func:`dpokit.losses.dispatch.preference_metrics`)."""


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """An exponential moving average of `values`, debiased as TensorBoard's smoothing is (so the first points
    are not pulled towards 0): ``avg_k = weight·avg_{k-1} + (1−weight)·x_k``, shown as ``avg_k / (1 − weight^k)``.
    """
    out, avg = [], 0.0
    for k, value in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * value
        out.append(avg / (1 - weight**k))
    return out


def _points(rows: list[dict], split: str, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` in the rows of `split`, skipping rows without it or with a non-finite value."""
    pairs = [(r["step"], r[key]) for r in rows
             if r.get("split") == split and isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [s for s, _ in pairs], [v for _, v in pairs]


def _curve(ax, rows: list[dict], key: str, label: str, color: str) -> None:
    """The train curve of `key` faint and smoothed, and its eval points (if any) as markers."""
    steps, values = _points(rows, "train", key)
    if steps:
        ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
        weight = min(0.9, max(0.0, 1 - 10 / len(values)))  # about a tenth of the run's points per time constant
        ax.plot(steps, smooth(values, weight), color=color, linewidth=1.8, label=f"{label} (train, smoothed)")
    steps, values = _points(rows, "eval", key)
    if steps:
        ax.plot(steps, values, "o--", color=color, markersize=4, linewidth=1, label=f"{label} (held-out)")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _training_curves(plt, sft: list[dict], dpo: list[dict], report: dict) -> object:
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    ax = axes[0]
    _curve(ax, sft, "loss", "SFT loss", "C0")
    ax.set(title="SFT: next-token loss", ylabel="loss (nats/token)")

    ax = axes[1]
    _curve(ax, dpo, "loss", "DPO loss", "C1")
    ax.axhline(math.log(2), color="gray", linestyle=":", label="ln 2: no preference (π = π_ref)")
    ax.set(title="DPO: preference loss", ylabel="loss −log σ(margin) (nats/pair)")

    ax = axes[2]
    _curve(ax, dpo, "rewards/accuracies", "reward accuracy", "C2")
    steps, _ = _points(dpo, "train", "rewards/accuracies")
    if "held_out_reward_accuracy" in report:
        at = steps[-1] if steps else report.get("config", {}).get("dpo_steps", 0)
        ax.plot([at], [report["held_out_reward_accuracy"]], "*", color="C3", markersize=12,
                label=f"held-out pairs, final: {report['held_out_reward_accuracy']:.3f}")
    ax.axhline(0.5, color="gray", linestyle=":", label="chance (0.5)")
    ax.text(0.98, 0.25, ACCURACY_NOTE, transform=ax.transAxes, ha="right", va="bottom", fontsize=7, color="dimgray")
    ax.set(title="DPO: implicit-reward accuracy", ylabel="share of pairs with chosen reward > rejected",
           ylim=(-0.02, 1.02))

    ax = axes[3]
    _curve(ax, dpo, "rewards/chosen", "chosen", "C2")
    _curve(ax, dpo, "rewards/rejected", "rejected", "C3")
    _curve(ax, dpo, "rewards/margins", "margin", "C4")
    ax.axhline(0, color="gray", linestyle=":", linewidth=0.8)
    ax.set(title="DPO: implicit rewards", ylabel="β·log π/π_ref (nats)")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=7, loc="lower right" if ax is axes[2] else "best")
    return fig


def _score_histogram(ax, report: dict) -> None:
    """SFT and DPO judge-score histograms with the positive threshold."""
    scores = report["sft_scores"] + report["dpo_scores"]
    low, high = min(-1.0, min(scores)), max(1.0, max(scores))  # VADER's range, widened for other judges
    bins = [low + (high - low) * i / 20 for i in range(21)]
    for name, key in (("SFT (π_ref)", "sft"), ("DPO (π_θ)", "dpo")):
        ax.hist(report[f"{key}_scores"], bins=bins, alpha=0.55,
                label=f"{name}: mean {report[key]['mean_score']:.2f}, "
                      f"{report[key]['positive_share']:.0%} positive")
    ax.axvline(POSITIVE_THRESHOLD, color="black", linestyle="--", linewidth=1,
               label=f"positive: score > {POSITIVE_THRESHOLD:g}")
    ax.set_xlabel(f"judge score ({_judge(report)}) of a held-out continuation")
    ax.set_ylabel("continuations")
    ax.legend(fontsize=7)


def _judge(report: dict) -> str:
    return str(report.get("config", {}).get("judge", "judge"))


def _summary(plt, report: dict) -> object:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    _score_histogram(axes[0], report)
    axes[0].set_title("judge scores of held-out continuations")

    ax = axes[1]  # the reward–KL plane of the paper's Figure 2: where DPO moved from the reference
    sft, dpo, kl = report["sft"]["mean_score"], report["dpo"]["mean_score"], report["kl"]["mean"]
    ax.annotate("", xy=(kl, dpo), xytext=(0, sft), arrowprops=dict(arrowstyle="->", color="gray"))
    ax.plot([0], [sft], "o", color="C0", markersize=9, label=f"SFT = π_ref: score {sft:.2f}, KL 0")
    ax.plot([kl], [dpo], "o", color="C1", markersize=9, label=f"DPO: score {dpo:.2f}, KL {kl:.2f}")
    ax.set(title="reward–KL: what the gain cost", xlabel="KL(π‖π_ref) (nats/sequence, from π's samples)",
           ylabel=f"mean judge score ({_judge(report)})")
    ax.set_xlim(-0.05 * max(kl, 1), 1.25 * max(kl, 1e-3))
    ax.legend(fontsize=7, loc="lower right")

    ax = axes[2]
    names = ["positive\nSFT", "positive\nDPO", "held-out\nreward accuracy"]
    values = [report["sft"]["positive_share"], report["dpo"]["positive_share"],
              report.get("held_out_reward_accuracy", float("nan"))]
    bars = ax.bar(names, values, color=["C0", "C1", "C2"])
    for bar, value in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, value + 0.02, f"{value:.1%}" if value == value else "n/a",
                ha="center", fontsize=8)
    ax.axhline(0.5, color="gray", linestyle=":", label="chance (0.5)")
    pairs = report.get("held_out_pairs")
    ax.set(title="share of continuations / pairs" + (f" ({pairs} held-out pairs)" if pairs else ""),
           ylabel="share", ylim=(0, 1.1))
    ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"dpokit demo: DPO on {_judge(report)} preferences: positive continuations "
                 f"{report['sft']['positive_share']:.0%} → {report['dpo']['positive_share']:.0%}", fontsize=11)
    return fig


def plot_report(output: str | Path, report: dict) -> list[Path]:
    """Write training_curves.png, judge_scores.png and summary.png into `output` from report.json's contents
    (`report`) and the metrics.jsonl of its sft/ and dpo/ stages (a missing one is left out); return their paths.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output = Path(output)
    stages = {name: output / name / "metrics.jsonl" for name in ("sft", "dpo")}
    rows = {name: read_metrics(path) if path.exists() else [] for name, path in stages.items()}
    paths = []
    fig = _training_curves(plt, rows["sft"], rows["dpo"], report)
    paths.append(_save(fig, output / "training_curves.png"))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    _score_histogram(ax, report)
    ax.set_title(f"{_judge(report)} scores on held-out prompts; KL(π‖π_ref) = {report['kl']['mean']:.2f} "
                 "nats/sequence", fontsize=10)
    paths.append(_save(fig, output / "judge_scores.png"))
    plt.close(fig)

    fig = _summary(plt, report)
    paths.append(_save(fig, output / "summary.png"))
    plt.close(fig)
    return paths


def plot_rounds(path: str | Path, rounds: list[dict]) -> Path:
    """Write a plot of the mean judge score (and positive share, for VADER) and the KL from the starting policy
    per round of `dpokit iterate` (round 0: the starting policy) to `path`; return it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numbers = [r["round"] for r in rounds]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].plot(numbers, [r["judge"]["mean_score"] for r in rounds], marker="o", label="mean judge score")
    if all("positive_share" in r["judge"] for r in rounds):
        axes[0].plot(numbers, [r["judge"]["positive_share"] for r in rounds], marker="s", label="positive share")
    axes[0].set_title("held-out judge score per round")
    axes[1].plot(numbers, [r["kl_vs_start"]["mean"] for r in rounds], marker="o", label="KL(π_r‖π_0)")
    axes[1].set_title("KL from the starting policy (nats/sequence)")
    for ax in axes:
        ax.set_xlabel("round (0: starting policy)")
        ax.set_xticks(numbers)
        ax.legend(fontsize=8)
    path = _save(fig, Path(path))
    plt.close(fig)
    return path
