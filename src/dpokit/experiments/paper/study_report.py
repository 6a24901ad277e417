"""What `dpokit reproduce dpo-vs-ppo` writes (dpokit.experiments.paper.study): study.json, report.md and figures.

* the frontier statistics at today's budget (frontier_report.statistics: per KL band, which of DPO, online DPO,
  PPO and PPO-GT dominates, from bootstrap intervals; frontier_hulls.png);
* the data-budget sweep: per budget the pairs, DPO's converged points, PPO's best, and DPO against PPO per band
  (study_budget.png);
* β sensitivity: DPO's KL and reward at convergence against the optimum π_ref·exp(r/β)/Z under the learned reward
  and under the judge (study_beta.png);
* what each method's best point cost in samples and labels.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from dpokit.experiments.paper.frontier_report import LABELS, statistics
from dpokit.experiments.paper.frontier_stats import band_verdict, compare_bands
from dpokit.experiments.paper.task import point_budget

OPTIMA = ("optimum-rm", "optimum-gt")


def _converged(points: list[dict], budget: float, beta: float | None = None) -> list[dict]:
    return [p for p in points if p["method"] == "dpo" and p.get("converged") and point_budget(p) == budget
            and (beta is None or p["knob"]["beta"] == beta)]


def _fmt(p: dict | None) -> str:
    return "-" if p is None else f"{p['reward']:.3f} ± {p.get('reward_se', 0):.3f} at KL {p['kl']:.2f}"


def _cap(study: dict) -> int:
    return study["config"]["convergence"]["max_steps"]


def precision_lines(study: dict) -> list[str]:
    """What dpokit.experiments.paper.precision added: per budget, the points measured further and what is left."""
    lines = []
    for budget, done in study.get("precision", {}).items():
        left = (f"; {len(done['left_over'])} left above it (at the cap of {done['cap']} samples)"
                if done["left_over"] else "")
        lines.append(f"- {budget}× the pairs: {done['topped_up']} points near a frontier measured further "
                     f"(+{done['samples_added']} samples) to a standard error ≤ {done['target']:g}{left}.")
    return ["## Standard errors", "", *lines, ""] if lines else []


def _best(points: list[dict]) -> dict | None:
    return max(points, key=lambda p: p["reward"]) if points else None


def budget_section(study: dict) -> list[str]:
    """The data-budget table and, per budget, DPO against PPO per KL band."""
    points, reference = study["points"], study["reference"]
    budgets = sorted({point_budget(p) for p in points if p["method"] in ("dpo", "ppo")})
    rows = ["| budget | pairs | DPO converged (β: step, reward ± s.e. at KL) | DPO best | PPO best |",
            "|---:|---:|---|---|---|"]
    sentences = []
    for b in budgets:
        mine = [p for p in points if point_budget(p) == b and p["method"] in ("dpo", "ppo")]
        converged = sorted(_converged(points, b), key=lambda p: (p["knob"]["beta"], p["knob"]["seed"]))
        cells = "; ".join(f"β {p['knob']['beta']:g} seed {p['knob']['seed']}: step {p['knob']['step']}"
                          f"{'' if p['knob']['step'] < p['stopped_at'] or p['stopped_at'] < _cap(study) else ' (cap)'}"
                          f", {_fmt(p)}" for p in converged)
        rows.append(f"| {b:g}× | {study['pairs'].get(f'{b:g}', '-')} | {cells or '-'} | "
                    f"{_fmt(_best([p for p in mine if p['method'] == 'dpo']))} | "
                    f"{_fmt(_best([p for p in mine if p['method'] == 'ppo']))} |")
        bands = compare_bands(mine, reference, ("dpo", "ppo"), seed=study.get("seed", 0), rounds=500)
        if bands:
            sentences += [f"**{b:g}× the pairs**:", "", band_verdict(bands, LABELS), ""]
    return ["## The data-budget sweep", "",
            "Pairs from other multiples of today's training prompts (π_ref's samples labelled by the judge as today); DPO "
            "trained to convergence on each (the lowest held-out loss; the run stops after the held-out loss has "
            "not improved for the patience's evaluations; '(cap)': it reached the step cap first), PPO against a "
            "reward model refitted on each budget's pairs. Reward ± standard error at KL per sequence.", "", *rows, "", *sentences, ""]


def beta_section(study: dict) -> list[str]:
    """DPO's converged KL and reward per β against the optimum under the learned reward and under the judge."""
    points = study["points"]
    optima = {(p["method"], p["knob"]["beta"]): p for p in points if p["method"] in OPTIMA}
    betas = sorted({b for _, b in optima})
    rows = ["| β | DPO converged: KL, reward | optimum under the learned RM: KL, reward (ESS) | "
            "optimum under the judge: KL, reward (ESS) |", "|---:|---|---|---|"]
    for beta in betas:
        dpo = [p for p in _converged(points, 1.0, beta) if p["knob"]["seed"] == study.get("seed", 0)]
        cells = [f"{p['kl']:.2f}, {p['reward']:.3f}" for p in dpo[:1]] or ["-"]
        for method in OPTIMA:
            o = optima.get((method, beta))
            cells.append("-" if o is None else f"{o['kl']:.2f}, {o['reward']:.3f} ({o['effective_samples']:.1f})")
        rows.append(f"| {beta:g} | " + " | ".join(cells) + " |")
    cap = next((p["kl_cap"] for p in points if p["method"] in OPTIMA), None)
    note = (f"The optimum is estimated by importance weighting {round(math.exp(cap))} samples "
            f"of π_ref per prompt: its KL cannot exceed log M = {cap:.2f} nats, and where the effective sample size "
            "(ESS) is a few samples the estimate is a lower bound." if cap else "")
    return ["## β sensitivity: how close DPO gets to the optimum it aims at", "", *rows, "", note,
            "", "![beta](study_beta.png)", ""]


def cost_section(study: dict) -> list[str]:
    """What each method's best point at today's budget cost."""
    rows = ["| method | best point | samples drawn | judge calls | reward-model calls |", "|---|---|---:|---:|---:|"]
    for method in ("dpo", "dpo-online", "dpo-online-gt", "ppo", "ppo-gt"):
        best = _best([p for p in study["points"] if p["method"] == method and point_budget(p) == 1.0])
        if best is not None:
            rows.append(f"| {LABELS.get(method, method)} | {_fmt(best)} | {best.get('samples_drawn', '-')} | "
                        f"{best.get('judge_calls', '-')} | {best.get('reward_model_calls', '-')} |")
    return ["## Sample budgets", "", "Texts sampled for training and labels spent, at each method's best point "
            "(online DPO and PPO: cumulative over their rounds and steps).", "", *rows, ""]


def plot_beta(path: Path, study: dict) -> None:
    """KL and reward against β: DPO converged (every seed) and the two optima."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = study["points"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    series = {"DPO, converged": [p for p in _converged(points, 1.0)],
              "optimum, learned RM": [p for p in points if p["method"] == "optimum-rm"],
              "optimum, judge": [p for p in points if p["method"] == "optimum-gt"]}
    for (label, mine), style in zip(series.items(), ("o", "s-", "^-")):
        mine = sorted(mine, key=lambda p: p["knob"]["beta"])
        for ax, key in zip(axes, ("kl", "reward")):
            ax.plot([p["knob"]["beta"] for p in mine], [p[key] for p in mine], style, label=label, alpha=0.8)
    axes[0].set_yscale("log")  # DPO's KL at small β is tens of nats, the optimum's a fraction of one
    for ax, name in zip(axes, ("KL(π ‖ π_ref) per sequence (nats, log)", "mean reward (judge)")):
        ax.set_xscale("log")
        ax.set_xlabel("β")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_study(out: Path, study: dict) -> None:
    """study.json, frontier_hulls.png, study_beta.png and report.md in `out`."""
    today = {"points": [p for p in study["points"] if point_budget(p) == 1.0 and p["method"] not in OPTIMA],
             "reference": study["reference"], "seed": study.get("seed", 0), "judge": study.get("judge", "vader")}
    stats = statistics(out, today)
    study["bands"] = today.get("bands", [])
    study["standard_errors"] = today.get("standard_errors")
    plot_beta(out / "study_beta.png", study)
    (out / "study.json").write_text(json.dumps(study, indent=1))
    seconds = study["seconds"]
    lines = ["# DPO vs PPO on the miniature frontier: online DPO, data budgets and β", "",
             f"`dpokit reproduce dpo-vs-ppo` with sizes `{study['sizes']}`, seed {study['seed']}: "
             f"{seconds['total']:.0f} s on {study['machine']}.", "", *stats, *budget_section(study),
             *beta_section(study), *cost_section(study), *precision_lines(study),
             "Seconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()) + "."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
