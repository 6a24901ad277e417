"""Statistics that decide the reward–KL comparison: each method's frontier as the upper concave hull of its points,
bootstrap intervals for it (seeds, then samples, resampled), and a per-KL-band verdict from those intervals.

A method's frontier is the best reward it reaches at KL ≤ k: the upper concave hull of its (KL, reward) points,
starting at π_ref's point (0, reward_ref), kept up to its highest vertex and flat beyond it. A configuration's
seeds (points whose knobs differ only in "seed") are averaged into one point: a hull over single seeds would pick
the luckiest seed. The bootstrap resamples, each round, the seeds of every configuration and then each drawn
seed's held-out samples (score and KL by the same index, so they move together), and π_ref's samples; the round's
hulls are then compared band by band.

Colours and labels come from the caller (dpokit.experiments.paper.frontier_report passes its own): that module
imports this one, so this one cannot import it back.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np

COMPARED = ("dpo", "dpo-online", "dpo-online-gt", "ppo", "ppo-gt")
DOMINATES, DOMINATED, LEVEL = "dominates", "is dominated by", "level within noise"
Hull = list[tuple[float, float]]


def _chain(xs: Sequence[float], ys: Sequence[float]) -> tuple[list[float], list[float]]:
    """The vertices of the non-decreasing upper concave hull of points sorted by (x, y): Andrew's monotone chain,
    cut at its highest vertex."""
    hx: list[float] = []
    hy: list[float] = []
    for x, y in zip(xs, ys):
        if hx and x == hx[-1]:  # sorted by (x, y): the later of two points at one KL is the higher
            hx.pop()
            hy.pop()
        while len(hx) >= 2 and (hx[-1] - hx[-2]) * (y - hy[-2]) - (hy[-1] - hy[-2]) * (x - hx[-2]) >= 0:
            hx.pop()
            hy.pop()
        hx.append(x)
        hy.append(y)
    top = hy.index(max(hy)) + 1 if hy else 0
    return hx[:top], hy[:top]


def upper_hull(points: Sequence[dict], reference: dict | None = None) -> Hull:
    """The vertices (KL, reward), by KL, of the upper concave hull of `points` (and of π_ref's point at KL 0 when
    `reference` is given), up to its highest vertex: beyond the last vertex the frontier stays flat. A sampled KL
    below 0 (estimation noise near π_ref; the true KL is never negative) counts as 0."""
    pairs = [(max(float(p["kl"]), 0.0), float(p["reward"])) for p in points]
    if reference is not None:
        pairs.append((0.0, float(reference["reward"])))
    pairs.sort()
    hx, hy = _chain([x for x, _ in pairs], [y for _, y in pairs])
    return list(zip(hx, hy))


def hull_value(hull: Hull, kl: float | np.ndarray) -> float | np.ndarray:
    """The frontier `hull` at `kl` (piecewise linear between vertices, flat beyond the last); NaN below its first
    vertex's KL (nothing reaches so little KL) or for an empty hull."""
    if not hull:
        return np.full(np.shape(kl), np.nan) if np.ndim(kl) else float("nan")
    xs, ys = zip(*hull)
    value = np.interp(kl, xs, ys, left=np.nan)
    return float(value) if np.ndim(kl) == 0 else value


def configurations(points: Sequence[dict]) -> list[list[dict]]:
    """`points` grouped by configuration (method and knob without "seed"), in order of first appearance: points
    whose knobs differ only in "seed" (or not at all) are seeds of one configuration."""
    groups: dict[str, list[dict]] = {}
    for p in points:
        knob = {k: v for k, v in p.get("knob", {}).items() if k != "seed"}
        groups.setdefault(json.dumps([p["method"], knob], sort_keys=True, default=str), []).append(p)
    return list(groups.values())


def merged(points: Sequence[dict]) -> list[dict]:
    """One point per configuration: the mean over its seeds of reward and KL (what the hull is drawn through)."""
    return [{"method": seeds[0]["method"], "knob": {k: v for k, v in seeds[0].get("knob", {}).items() if k != "seed"},
             "reward": float(np.mean([p["reward"] for p in seeds])), "kl": float(np.mean([p["kl"] for p in seeds])),
             "seeds": len(seeds)} for seeds in configurations(points)]


def _stack(seeds: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per seed its scores and KLs padded to one width, and its sample count. A point without per-sample scores is
    one sample (its mean); one without per-sample KLs (Best-of-N's analytic bound) has its KL on every sample."""
    rows = []
    for p in seeds:
        scores = np.asarray(p.get("scores") or [p["reward"]], dtype=float)
        kls = np.asarray(p["kls"], dtype=float) if p.get("kls") else np.full(len(scores), float(p["kl"]))
        rows.append((scores, kls))
    n = np.array([len(s) for s, _ in rows])
    scores, kls = np.zeros((len(rows), n.max())), np.zeros((len(rows), n.max()))
    for i, (s, k) in enumerate(rows):
        scores[i, : len(s)], kls[i, : len(k)] = s, k
    return scores, kls, n


def _resample_configuration(seeds: list[dict], rounds: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Per round, the configuration's (KL, reward): its seeds drawn with replacement, then each drawn seed's samples
    drawn with replacement (a seed drawn twice is resampled twice, independently)."""
    scores, kls, n = _stack(seeds)
    width, count = n.max(), len(seeds)
    pick = rng.integers(0, count, size=(rounds, count))
    kl_sum, reward_sum = np.zeros(rounds), np.zeros(rounds)
    for slot in range(count):
        rows = pick[:, slot][:, None]
        if n.min() == width:
            index = rng.integers(0, width, size=(rounds, width))
            reward_sum += scores[rows, index].mean(axis=1)
            kl_sum += kls[rows, index].mean(axis=1)
        else:  # seeds of different sizes: a seed of n samples is resampled n at a time, never from the padding
            size = n[rows]
            index = (rng.random((rounds, width)) * size).astype(np.intp)
            mask = np.arange(width) < size
            reward_sum += np.where(mask, scores[rows, index], 0.0).sum(axis=1) / size[:, 0]
            kl_sum += np.where(mask, kls[rows, index], 0.0).sum(axis=1) / size[:, 0]
    return kl_sum / count, reward_sum / count


def _resample_points(points: Sequence[dict], rounds: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Arrays rounds × configurations of KL and reward."""
    drawn = [_resample_configuration(seeds, rounds, rng) for seeds in configurations(points)]
    return tuple(np.stack([d[i] for d in drawn], axis=1) if drawn else np.zeros((rounds, 0)) for i in (0, 1))


def _resample_reference(reference: dict, rounds: int, rng: np.random.Generator) -> np.ndarray:
    """π_ref's mean reward per round (its KL is 0 by definition)."""
    scores = np.asarray(reference.get("scores") or [reference["reward"]], dtype=float)
    return scores[rng.integers(0, len(scores), size=(rounds, len(scores)))].mean(axis=1)


def _hull_values(kl: np.ndarray, reward: np.ndarray, reference: np.ndarray | None, grid: np.ndarray) -> np.ndarray:
    """Each round's hull on `grid`: rounds × len(grid). The sort is vectorised; the chain runs per round over a
    few dozen configurations, which costs far less than the resampling."""
    rounds = kl.shape[0]
    kl = np.maximum(kl, 0.0)
    if reference is not None:
        kl = np.concatenate([np.zeros((rounds, 1)), kl], axis=1)
        reward = np.concatenate([reference[:, None], reward], axis=1)
    values = np.full((rounds, len(grid)), np.nan)
    if kl.shape[1] == 0:
        return values
    order = np.lexsort((reward, kl))  # along the last axis: by KL, then by reward
    xs = np.take_along_axis(kl, order, axis=1).tolist()
    ys = np.take_along_axis(reward, order, axis=1).tolist()
    for r in range(rounds):
        hx, hy = _chain(xs[r], ys[r])
        values[r] = np.interp(grid, hx, hy, left=np.nan)
    return values


def bootstrap_hulls(points: Sequence[dict], reference: dict | None, grid: Sequence[float], rounds: int = 1000,
                    seed: int = 0) -> np.ndarray:
    """The hull of `points` (one frontier, from π_ref's point when `reference` is given) in `rounds` bootstrap
    rounds, evaluated on `grid`: an array rounds × len(grid). Deterministic for a `seed`."""
    ref = None if reference is None else _resample_reference(reference, rounds, np.random.default_rng([seed, 0]))
    kl, reward = _resample_points(points, rounds, np.random.default_rng([seed, 1]))
    return _hull_values(kl, reward, ref, np.asarray(grid, dtype=float))


@dataclass(frozen=True)
class Draws:
    """One bootstrap of several methods: π_ref's reward per round (shared: every method starts from the same π_ref)
    and, per method, each configuration's KL and reward per round (rounds × configurations)."""

    reference: np.ndarray
    kl: dict[str, np.ndarray]
    reward: dict[str, np.ndarray]

    def hulls(self, method: str, grid: np.ndarray) -> np.ndarray:
        """`method`'s hull per round on `grid` (rounds × len(grid))."""
        return _hull_values(self.kl[method], self.reward[method], self.reference, grid)


def resample(points: Sequence[dict], reference: dict, methods: Sequence[str] = COMPARED, rounds: int = 1000,
             seed: int = 0) -> Draws:
    """The bootstrap of `methods`' points, computed once for :func:`compare_bands` and :func:`plot_hulls`. Each
    method draws from its own stream (seeded by the seed and its name), so methods are resampled independently
    and a method's draws do not depend on which others are compared."""
    ref = _resample_reference(reference, rounds, np.random.default_rng([seed, 0]))
    kl, reward = {}, {}
    for m in methods:
        rng = np.random.default_rng([seed, 2, zlib.crc32(m.encode())])
        kl[m], reward[m] = _resample_points([p for p in points if p["method"] == m], rounds, rng)
    return Draws(ref, kl, reward)


def band_edges(points: Sequence[dict], methods: Sequence[str] = COMPARED) -> list[float]:
    """0, 1, 3 and 6 nats (those at least half a nat below the largest KL: no sliver of a last band), then the
    largest KL of `methods`' points; [] when none of them moved from π_ref."""
    top = max((float(p["kl"]) for p in points if p["method"] in methods), default=0.0)
    return [0.0] + [e for e in (1.0, 3.0, 6.0) if e <= top - 0.5] + [top] if top > 0 else []


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail], axis=0)
    return low, high


def _pair(a: str, b: str, estimate: dict, boot: dict, part: slice, level: float) -> dict:
    """A against B over one band: the band-mean difference of their hulls with its interval, and the verdict."""
    difference = boot[a][:, part] - boot[b][:, part]
    low, high = _interval(difference.mean(axis=1), level)
    low_at, high_at = _interval(difference, level)
    a_below, b_below = bool((high_at < 0).any()), bool((low_at > 0).any())
    if low > 0 and not a_below:
        verdict = DOMINATES
    elif high < 0 and not b_below:
        verdict = DOMINATED
    else:
        verdict = LEVEL
    return {"a": a, "b": b, "difference": float(np.mean(estimate[a][part] - estimate[b][part])),
            "low": float(low), "high": float(high), "verdict": verdict, "crossing": a_below and b_below}


def _top(present: list[str], pairs: list[dict]) -> list[str]:
    """The methods no other dominates, when each of them dominates every other method and no two of them cross
    (each above the other somewhere is not level); else none."""
    beats = {(p["a"], p["b"]) if p["verdict"] == DOMINATES else (p["b"], p["a"])
             for p in pairs if p["verdict"] != LEVEL}
    top = [m for m in present if not any(loser == m for _, loser in beats)]
    rest = [m for m in present if m not in top]
    crossing = any(p["crossing"] and p["a"] in top and p["b"] in top for p in pairs)
    return top if not crossing and all((t, r) in beats for t in top for r in rest) else []


def compare_bands(points: Sequence[dict], reference: dict, methods: Sequence[str] = COMPARED,
                  bands: Sequence[float] | None = None, rounds: int = 1000, level: float = 0.95, seed: int = 0, *,
                  draws: Draws | None = None, grid_points: int = 25) -> list[dict]:
    """Per KL band (`bands`: its edges; default :func:`band_edges`), every pair of `methods` with points compared
    on `grid_points` KLs spread over the band: the band-mean difference of their hulls (`difference`, from the
    points; `low`, `high`: its bootstrap interval at `level`) and a verdict. "A dominates B" needs the interval
    above 0 and, at no grid KL of the band, B above A with confidence (A − B's pointwise interval wholly below 0);
    "is dominated by" the mirror; otherwise "level within noise" (`crossing` when each is above the other with
    confidence somewhere). `top`: the methods no other dominates, when they dominate all the rest and none of them
    cross (all of them when all are level); empty when the verdicts do not order them. `hulls`: each method's
    band-mean hull with its interval. [] when fewer than two of `methods` have points. `draws` (:func:`resample`)
    reuses a bootstrap."""
    present = [m for m in methods if any(p["method"] == m for p in points)]
    edges = [float(e) for e in bands] if bands is not None else band_edges(points, present)
    if len(present) < 2 or len(edges) < 2:
        return []
    draws = draws or resample(points, reference, present, rounds, seed)
    grid = np.concatenate([np.linspace(lo, hi, grid_points) for lo, hi in zip(edges, edges[1:])])
    boot = {m: draws.hulls(m, grid) for m in present}
    estimate = {m: hull_value(upper_hull(merged([p for p in points if p["method"] == m]), reference), grid)
                for m in present}
    result = []
    for k, (lo, hi) in enumerate(zip(edges, edges[1:])):
        part = slice(k * grid_points, (k + 1) * grid_points)
        pairs = [_pair(a, b, estimate, boot, part, level) for a, b in combinations(present, 2)]
        hulls = {}
        for m in present:
            low, high = _interval(boot[m][:, part].mean(axis=1), level)
            hulls[m] = {"mean": float(estimate[m][part].mean()), "low": float(low), "high": float(high)}
        result.append({"kl_from": lo, "kl_to": hi, "level": level, "rounds": len(draws.reference),
                       "methods": present, "hulls": hulls, "pairs": pairs, "top": _top(present, pairs)})
    return result


def _names(methods: Sequence[str], labels: Mapping[str, str]) -> str:
    names = [labels.get(m, m) for m in methods]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def band_table(result: list[dict], labels: Mapping[str, str] | None = None) -> str:
    """Two Markdown tables: each method's band-mean hull with its interval and the methods on top, per band; then
    every pair's band-mean difference, its interval and the verdict."""
    labels = labels or {}
    if not result:
        return ""
    pct = f"{result[0]['level']:.0%}"
    methods = result[0]["methods"]
    rows = ["| KL band | " + " | ".join(labels.get(m, m) for m in methods) + " | on top |",
            "|---|" + "---:|" * len(methods) + "---|"]
    for band in result:
        cells = [f"{h['mean']:.3f} ({h['low']:.3f} to {h['high']:.3f})" for h in band["hulls"].values()]
        rows.append(f"| {band['kl_from']:.3g}–{band['kl_to']:.3g} | " + " | ".join(cells) + " | "
                    + (_names(band["top"], labels) if band["top"] else "none") + " |")
    rows += ["", f"| KL band | A vs B | mean A − B | {pct} interval | verdict |", "|---|---|---:|---|---|"]
    for band in result:
        for p in band["pairs"]:
            a, b = labels.get(p["a"], p["a"]), labels.get(p["b"], p["b"])
            verdict = f"{a} {p['verdict']} {b}" if p["verdict"] != LEVEL else LEVEL + (" (crossing)" * p["crossing"])
            rows.append(f"| {band['kl_from']:.3g}–{band['kl_to']:.3g} | {a} vs {b} | {p['difference']:+.3f} | "
                        f"{p['low']:+.3f} to {p['high']:+.3f} | {verdict} |")
    return "\n".join(rows)


def _clause(p: dict, labels: Mapping[str, str], pct: str) -> str:
    """One pair in words, the winner first."""
    a, b, d, low, high = p["a"], p["b"], p["difference"], p["low"], p["high"]
    if p["verdict"] == DOMINATED:
        a, b, d, low, high = b, a, -d, -high, -low
    numbers = f"({d:+.3f}, {pct} interval {low:+.3f} to {high:+.3f})"
    a, b = labels.get(a, a), labels.get(b, b)
    if p["verdict"] != LEVEL:
        return f"{a} dominates {b} {numbers}"
    if p["crossing"]:
        return f"{a} and {b} cross, each above the other with confidence somewhere in the band {numbers}"
    return f"{a} and {b} are level within noise {numbers}"


def band_verdict(result: list[dict], labels: Mapping[str, str] | None = None) -> str:
    """One sentence per band, as Markdown list items: each pair's verdict with its numbers, then who is on top."""
    labels = labels or {}
    lines = []
    for band in result:
        pct = f"{band['level']:.0%}"
        clauses = "; ".join(_clause(p, labels, pct) for p in band["pairs"])
        top = band["top"]
        if not top:
            tail = "the verdicts put no method or level group on top"
        elif len(top) == len(band["methods"]):
            tail = "all are level within noise"
        elif len(top) == 1:
            tail = f"{_names(top, labels)} is on top"
        else:
            tail = f"{_names(top, labels)} are on top, level with each other"
        lines.append(f"- KL {band['kl_from']:.3g}–{band['kl_to']:.3g} nats: {clauses}; {tail}.")
    return "\n".join(lines)


def se_check(points: Sequence[dict], reference: dict, methods: Sequence[str] = COMPARED, limit: float = 0.01,
             within: float = 2.0) -> dict:
    """The points near the frontier (reward on or within `within` standard errors of some compared method's hull
    at the point's KL, any method's point) and those of them whose reward_se exceeds `limit`."""
    hulls = [upper_hull(merged([p for p in points if p["method"] == m]), reference) for m in methods
             if any(p["method"] == m for p in points)]
    near = [p for p in points
            if any(abs(hull_value(h, max(p["kl"], 0.0)) - p["reward"]) <= within * p.get("reward_se", 0.0) + 1e-12
                   for h in hulls)]
    over = [{k: p.get(k) for k in ("method", "knob", "reward", "reward_se", "kl")} for p in near
            if p.get("reward_se", 0.0) > limit]
    return {"limit": limit, "within": within, "near": len(near), "over": over, "holds": not over}


def se_sentence(check: dict, labels: Mapping[str, str] | None = None) -> str:
    """Whether every point near the frontier has a standard error within the limit, naming those that do not."""
    labels = labels or {}
    where = f"within {check['within']:g} standard errors of a compared method's hull"
    if not check["over"]:
        return (f"All {check['near']} points near the frontier ({where}) have a reward standard error ≤ "
                f"{check['limit']:g}: the requirement holds.")
    over = check["over"]
    names = "; ".join(f"{labels.get(p['method'], p['method'])} "
                      + ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in p["knob"].items())
                      + f" (± {p['reward_se']:.3f} at KL {p['kl']:.2f})" for p in over[:8])
    names += f"; and {len(over) - 8} more (frontier.json lists them)" if len(over) > 8 else ""
    return (f"{len(check['over'])} of the {check['near']} points near the frontier ({where}) have a reward standard "
            f"error above {check['limit']:g}, so the requirement does not hold: {names}.")


def plot_hulls(path: Path, points: Sequence[dict], reference: dict, methods: Sequence[str] = COMPARED,
               rounds: int = 1000, level: float = 0.95, seed: int = 0, *, judge: str = "vader",
               colours: Mapping[str, str] | None = None, labels: Mapping[str, str] | None = None,
               draws: Draws | None = None) -> Path:
    """Each of `methods`' hulls (a line), its pointwise bootstrap interval at `level` (shaded) and its points, on
    the symmetric-log KL axis of frontier_report.plot_frontier, to `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours, labels = colours or {}, labels or {}
    present = [m for m in methods if any(p["method"] == m for p in points)]
    draws = draws or resample(points, reference, present, rounds, seed)
    top = max([float(p["kl"]) for p in points if p["method"] in present] + [1.0])
    # dense where the axis is linear (below 1 nat) and log-spaced above it, so straight segments draw smoothly
    grid = np.unique(np.concatenate([np.linspace(0.0, 1.0, 60), np.geomspace(1.0, top * 1.1, 140)]))
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for m in present:
        mine = [p for p in points if p["method"] == m]
        colour, label = colours.get(m), labels.get(m, m)
        low, high = _interval(draws.hulls(m, grid), level)
        line, = ax.plot(grid, hull_value(upper_hull(merged(mine), reference), grid), color=colour, label=label)
        ax.fill_between(grid, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.scatter([p["kl"] for p in mine], [p["reward"] for p in mine], s=12, color=line.get_color(), alpha=0.6)
    ax.scatter([0.0], [reference["reward"]], marker="*", s=120, color="black", label="SFT (π_ref)", zorder=3)
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("KL(π ‖ π_ref) per sequence (nats; linear below 1, log above)")
    ax.set_ylabel("best mean reward at no more KL (" + ("VADER compound" if judge == "vader" else judge) + ")")
    ax.set_title(f"frontiers (upper hulls) with {level:.0%} bootstrap bands, {len(draws.reference)} rounds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
