"""What the frontier sweep writes: frontier.json, the reward–KL plot (the paper's Fig. 2, left) and report.md with
a verdict computed from the points (does DPO's frontier dominate PPO's?) and, per KL band, the verdict of the
frontiers' bootstrap intervals (dpokit.experiments.paper.frontier_stats) with its plot, frontier_hulls.png."""

from __future__ import annotations

import json
import os
from pathlib import Path

from dpokit.experiments.paper.frontier_stats import (COMPARED, band_table, band_verdict, compare_bands, plot_hulls,
                                                    resample, se_check, se_sentence)

COLOURS = {"dpo": "tab:red", "dpo-online": "darkred", "dpo-online-gt": "salmon", "ppo": "tab:blue",
           "ppo-gt": "tab:purple", "preferred-ft": "tab:green", "unlikelihood": "tab:orange", "best-of-n": "tab:olive"}
LABELS = {"dpo": "DPO", "dpo-online": "Online DPO (RM)", "dpo-online-gt": "Online DPO (GT)", "ppo": "PPO",
          "ppo-gt": "PPO-GT", "preferred-ft": "Preferred-FT", "unlikelihood": "Unlikelihood", "best-of-n": "Best-of-N"}


def dominates(a: dict, b: dict) -> bool:
    """Whether point `a` has at least `b`'s reward at no more KL."""
    return a["reward"] >= b["reward"] and a["kl"] <= b["kl"]


def undominated(points: list[dict], by: list[dict]) -> list[dict]:
    """The points of `points` that no point of `by` dominates."""
    return [p for p in points if not any(dominates(q, p) for q in by)]


def pareto_front(points: list[dict]) -> list[dict]:
    """The points no other point of the list dominates strictly (better in one coordinate), by KL."""
    front = [p for p in points if not any(dominates(q, p) and (q["reward"], -q["kl"]) != (p["reward"], -p["kl"])
                                          for q in points)]
    return sorted(front, key=lambda p: p["kl"])


def _knob(point: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in point["knob"].items()) or "-"


def _best(points: list[dict]) -> dict:
    return max(points, key=lambda p: p["reward"])


def _best_below(point: dict, dpo: list[dict]) -> str:
    """The best DPO reward at no more KL than `point`'s, with its standard error: how far DPO falls short."""
    below = [q for q in dpo if q["kl"] <= point["kl"]]
    if not below:
        return "; no DPO point at so little KL"
    best = _best(below)
    return f"; DPO's best at no more KL: {best['reward']:.3f} ± {best.get('reward_se', 0):.3f}"


def _compare(method: str, mine: list[dict], dpo: list[dict]) -> str:
    """One sentence: how many of `method`'s points some DPO point dominates, naming the others."""
    left = undominated(mine, dpo)
    name = LABELS[method]
    if not left:
        return (f"DPO's frontier dominates {name}'s: each of the {len(mine)} {name} points has a DPO point with at "
                "least its reward at no more KL.")
    which = "; ".join(f"{_knob(p)} (reward {p['reward']:.3f} at KL {p['kl']:.2f}{_best_below(p, dpo)})" for p in left)
    return (f"DPO's frontier does not dominate {name}'s: {len(left)} of the {len(mine)} {name} points have no DPO "
            f"point with at least their reward at no more KL: {which}.")


def verdict(points: list[dict], skipped: dict[str, str] | None = None) -> str:
    """One paragraph computed from `points`: for each PPO point, is there a DPO point with at least its reward at no
    more KL (then the same for PPO-GT and each baseline), and the best reward each method reached."""
    by: dict[str, list[dict]] = {}
    for p in points:
        by.setdefault(p["method"], []).append(p)
    dpo = by.get("dpo", [])
    if not dpo:
        return "No DPO points: nothing to compare."
    if by.get("ppo"):
        sentences = [_compare("ppo", by["ppo"], dpo)]
    else:
        why = (skipped or {}).get("ppo", "not run")
        sentences = [f"There are no PPO points ({why}), so the paper's main comparison cannot be made here."]
    sentences += [_compare(m, by[m], dpo) for m in ("ppo-gt", "preferred-ft", "unlikelihood", "best-of-n")
                  if by.get(m)]
    if by.get("best-of-n"):
        sentences.append("(Best-of-N's KL is the analytic bound log N − (N−1)/N, not a sampled estimate.)")
    best = ", ".join(f"{LABELS.get(m, m)} {_best(ps)['reward']:.3f} (at KL {_best(ps)['kl']:.2f})"
                     for m, ps in by.items())
    sentences.append(f"Highest mean reward reached: {best}.")
    return " ".join(sentences)


def plot_frontier(path: Path, points: list[dict], reference: dict | None = None, judge: str = "vader") -> Path:
    """Reward (the `judge`'s score) against KL(π‖π_ref), one colour per method (the paper's Fig. 2, left), to
    `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for method, colour in COLOURS.items():
        mine = [p for p in points if p["method"] == method]
        if mine:
            ax.scatter([p["kl"] for p in mine], [p["reward"] for p in mine], s=22, color=colour, label=LABELS[method],
                       marker="^" if method == "best-of-n" else "o", alpha=0.85)
    if reference is not None:
        ax.scatter([0.0], [reference["reward"]], marker="*", s=120, color="black", label="SFT (π_ref)")
    # symmetric-log x: linear below 1 nat, where most points lie, logarithmic above (a degenerate run can reach 50)
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("KL(π ‖ π_ref) per sequence (nats; linear below 1, log above)")
    ax.set_ylabel("mean reward (" + ("VADER compound" if judge == "vader" else judge) + ")")
    ax.set_title("controlled sentiment (embedded review model): reward vs KL")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def table(points: list[dict], reference: dict | None = None) -> str:
    """The points as a Markdown table, by method then KL."""
    rows = ["| method | knob | reward ± s.e. | KL (nats) | positive |", "|---|---|---:|---:|---:|"]
    if reference is not None:
        rows.append(f"| SFT (π_ref) | - | {reference['reward']:.3f} ± {reference.get('reward_se', 0):.3f} | "
                    f"{reference['kl']:.2f} | {reference['positive_share']:.1%} |")
    order = list(COLOURS)
    for p in sorted(points, key=lambda p: (order.index(p["method"]) if p["method"] in order else 99, p["kl"])):
        bound = " (bound)" if p.get("kl_estimate", "sampled") != "sampled" else ""
        rows.append(f"| {p['method']} | {_knob(p)} | {p['reward']:.3f} ± {p.get('reward_se', 0):.3f} | "
                    f"{p['kl']:.2f}{bound} | {p['positive_share']:.1%} |")
    return "\n".join(rows)


def machine() -> str:
    """The CPU count and load averages now: how busy the machine was when a run ended."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{os.cpu_count()} CPUs, load average {load} (1, 5, 15 min) at the end of the run"


def statistics(out: Path, frontier: dict, rounds: int = 1000) -> list[str]:
    """The report's "Frontier statistics" section, when at least two compared methods (frontier_stats.COMPARED)
    have points and π_ref was measured: per KL band, which method's hull dominates, from bootstrap intervals
    (frontier_stats.compare_bands), the standard-error check and frontier_hulls.png. Adds "bands" and
    "standard_errors" to `frontier`; [] (and nothing added) otherwise."""
    points, reference = frontier["points"], frontier.get("reference")
    present = [m for m in COMPARED if any(p["method"] == m for p in points)]
    if reference is None or len(present) < 2:
        return []
    seed = frontier.get("seed", 0)
    draws = resample(points, reference, present, rounds, seed)
    bands = compare_bands(points, reference, present, seed=seed, draws=draws)
    check = se_check(points, reference, present)
    frontier["bands"], frontier["standard_errors"] = bands, check
    plot_hulls(out / "frontier_hulls.png", points, reference, present, seed=seed,
               judge=frontier.get("judge", "vader"), colours=COLOURS, labels=LABELS, draws=draws)
    if not bands:
        return ["## Frontier statistics", "", "No compared method moved from π_ref (no point above KL 0): there is "
                "no KL band to compare.", "", "![frontier hulls](frontier_hulls.png)", ""]
    level = f"{bands[0]['level']:.0%}"
    return [
        "## Frontier statistics",
        "",
        "Each method's frontier is the upper concave hull of its points from π_ref's (KL 0), kept up to its highest "
        "point and flat beyond: the best mean reward it reaches at no more KL. A configuration's seeds are averaged "
        f"into one point. Intervals: {rounds} bootstrap rounds, each resampling every configuration's seeds, then "
        "each seed's held-out samples (reward and KL together), and π_ref's samples. Per KL band, A dominates B "
        f"when the {level} interval of the band-mean difference of their hulls is above 0 and at no KL of the band "
        "is B's hull above A's with confidence; otherwise they are level within noise (or cross, when each is above "
        "the other with confidence somewhere).",
        "",
        band_verdict(bands, LABELS),
        "",
        band_table(bands, LABELS),
        "",
        "Standard errors: " + se_sentence(check, LABELS),
        "",
        "![frontier hulls](frontier_hulls.png)",
        "",
    ]


def write_outputs(out: Path, frontier: dict) -> None:
    """frontier.json, frontier.png, report.md and, when two compared methods have points, frontier_hulls.png in
    `out`."""
    stats = statistics(out, frontier)
    (out / "frontier.json").write_text(json.dumps(frontier, indent=1))
    plot_frontier(out / "frontier.png", frontier["points"], frontier.get("reference"), frontier.get("judge", "vader"))
    seconds = frontier["seconds"]
    lines = [
        "# Reward–KL frontier (DPO paper §6.1, Fig. 2 left), miniature",
        "",
        f"`dpokit reproduce sentiment` with sizes `{frontier['sizes']}`, seed {frontier['seed']}: "
        f"{seconds['total']:.0f} s on {frontier.get('machine') or machine()}.",
        "",
        "## Verdict",
        "",
        verdict(frontier["points"], frontier.get("skipped")),
        "",
        "![frontier](frontier.png)",
        "",
        *stats,
        "## Points",
        "",
        f"Reward: mean score ({frontier.get('judge', 'vader')}) of the policy's samples on held-out prompts; KL: "
        "the mean of log π(y|x) − log π_ref(y|x) over the same samples. Best-of-N's KL is the analytic bound "
        "log N − (N−1)/N. ± s.e.: the standard error of the mean reward (sampling noise: the point-by-point "
        "verdict compares the means as they are; the frontier statistics, where shown, account for it).",
        "",
        table(frontier["points"], frontier.get("reference")),
        "",
        "Seconds per method: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()) + ".",
    ]
    for method, why in frontier.get("skipped", {}).items():
        lines.append(f"\n{method}: skipped ({why}).")
    (out / "report.md").write_text("\n".join(lines) + "\n")
