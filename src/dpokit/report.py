"""Plots of a demo run: training curves and judge-score distributions, as PNG files beside report.json."""

from __future__ import annotations

from pathlib import Path

from dpokit.metrics import read_metrics


def _curve(ax, rows, key, label):
    points = [(r["step"], r[key]) for r in rows if key in r]
    if points:
        ax.plot(*zip(*points), label=label)


def plot_report(output: str | Path, report: dict) -> list[Path]:
    """Write training_curves.png and judge_scores.png into `output`; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output = Path(output)
    paths = []
    dpo = read_metrics(output / "dpo" / "metrics.jsonl")
    sft = read_metrics(output / "sft" / "metrics.jsonl")
    train = [r for r in dpo if r["split"] == "train"]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    _curve(axes[0], [r for r in sft if r["split"] == "train"], "loss", "SFT loss (nats/token)")
    axes[0].set_title("SFT")
    _curve(axes[1], train, "loss", "DPO loss")
    axes[1].set_title("DPO loss")
    _curve(axes[2], train, "rewards/accuracies", "reward accuracy")
    axes[2].set_title("DPO reward accuracy")
    _curve(axes[3], train, "rewards/chosen", "chosen")
    _curve(axes[3], train, "rewards/rejected", "rejected")
    _curve(axes[3], train, "rewards/margins", "margin")
    axes[3].set_title("implicit rewards β·log π/π_ref")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(output / "training_curves.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.6))
    bins = [i / 10 for i in range(-10, 11)]
    ax.hist(report["sft_scores"], bins=bins, alpha=0.6,
            label=f"SFT: mean {report['sft']['mean_score']:.2f}, {report['sft']['positive_share']:.0%} positive")
    ax.hist(report["dpo_scores"], bins=bins, alpha=0.6,
            label=f"DPO: mean {report['dpo']['mean_score']:.2f}, {report['dpo']['positive_share']:.0%} positive")
    ax.set_xlabel("judge score of held-out continuations")
    ax.set_ylabel("continuations")
    ax.set_title(f"held-out prompts; KL(π‖π_ref) = {report['kl']['mean']:.2f} nats/sequence")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(output / "judge_scores.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths
