"""Win rates: how often a model's response beats a baseline's, as a pairwise judge sees it (the DPO paper's
GPT-4 win rates, §6.2-6.3), with a bootstrap confidence interval.

Each prompt gives one outcome from the model's side: 1 (win), 0 (loss) or 0.5 (tie: ties count as half). The
win rate is their mean. Which response the judge sees first is drawn per prompt from the seed
(:func:`model_first`), so a judge that favours a position is as likely to favour either model. The interval is
the percentile bootstrap of the mean (:func:`bootstrap_ci`). A judge that fails on a pair (raises, or returns
NaN) is asked again pair by pair to find which prompts it fails on (:func:`judge_pairs`).

Only the standard library and numpy here; sampling the two models is :mod:`dpokit.judges.winrate_run`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dpokit.errors import ConfigError
from dpokit.judges.pairwise import PairwiseJudge
from dpokit.data.prompts import Prompt

TIE_TOLERANCE = 1e-6
"""A preference within this of 0.5 is a tie (an LLM judge's averaged probabilities are rarely exactly 0.5)."""


@dataclass(frozen=True)
class Judged:
    """One prompt's comparison: whether the model's response was shown first, the judge's preference for the
    response shown first (NaN when it failed), its outcome for the model (1, 0, 0.5; None when it failed), and
    the judge's error."""

    model_first: bool
    preference: float
    outcome: float | None
    error: str | None = None


def model_first(n: int, seed: int) -> list[bool]:
    """For each of `n` prompts, whether the model's response is shown first: a fair coin per prompt."""
    rng = random.Random(seed)
    return [rng.random() < 0.5 for _ in range(n)]


def outcome(preference: float, model_is_first: bool) -> float:
    """The model's outcome from the judge's preference for the first response: 1 win, 0 loss, 0.5 tie."""
    for_model = preference if model_is_first else 1.0 - preference
    if abs(for_model - 0.5) <= TIE_TOLERANCE:
        return 0.5
    return 1.0 if for_model > 0.5 else 0.0


def win_rate(outcomes: Sequence[float]) -> float:
    """The mean outcome: (wins + ties / 2) / n."""
    if not outcomes:
        raise ConfigError("no prompt was judged: a win rate needs at least one")
    return float(sum(outcomes)) / len(outcomes)


def bootstrap_ci(outcomes: Sequence[float], *, resamples: int = 2000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """The percentile bootstrap interval of the win rate: `resamples` resamples of the prompts with
    replacement (numpy, seeded), the (1 - confidence) / 2 and (1 + confidence) / 2 quantiles of their means."""
    if resamples < 1 or not 0 < confidence < 1:
        raise ConfigError(f"need resamples >= 1 and 0 < confidence < 1; got {resamples} and {confidence}")
    values = np.asarray(outcomes, dtype=np.float64)
    win_rate(outcomes)  # refuses an empty list
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    low, high = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(low), float(high)


def summarise(judged: Sequence[Judged], *, resamples: int = 2000, confidence: float = 0.95, seed: int = 0) -> dict:
    """Win rate, interval and counts of the judged prompts (those the judge failed on count as skipped)."""
    outcomes = [j.outcome for j in judged if j.outcome is not None]
    low, high = bootstrap_ci(outcomes, resamples=resamples, confidence=confidence, seed=seed)
    return {"win_rate": win_rate(outcomes), "ci_low": low, "ci_high": high,
            "wins": outcomes.count(1.0), "losses": outcomes.count(0.0), "ties": outcomes.count(0.5),
            "n": len(outcomes), "skipped": len(judged) - len(outcomes), "confidence": confidence,
            "resamples": resamples}


def _judge_one_by_one(judge: PairwiseJudge, prompts, firsts, seconds) -> tuple[list[float], dict[int, str]]:
    preferences, errors = [], {}
    for i, triple in enumerate(zip(prompts, firsts, seconds)):
        try:
            (value,) = judge(*([x] for x in triple))
            preferences.append(float(value))
        except Exception as error:  # noqa: BLE001  (any judge's failure is reported with its prompt)
            preferences.append(math.nan)
            errors[i] = f"{type(error).__name__}: {error}"
    return preferences, errors


def judge_pairs(judge: PairwiseJudge, prompts: Sequence[Prompt], firsts: Sequence[str],
                seconds: Sequence[str]) -> tuple[list[float], dict[int, str]]:
    """The judge's preference for the first response of each pair, and its errors by pair index. Identical
    responses tie without asking. When the judge raises on the batch, each pair is asked alone to find the
    ones it fails on; NaN (or a value outside [0, 1]) is an error too."""
    ask = [i for i in range(len(prompts)) if firsts[i] != seconds[i]]
    preferences = [0.5] * len(prompts)
    errors: dict[int, str] = {}
    if ask:
        picked = ([prompts[i] for i in ask], [firsts[i] for i in ask], [seconds[i] for i in ask])
        try:
            answers = [float(v) for v in judge(*picked)]
            if len(answers) != len(ask):
                raise ValueError(f"the judge gave {len(answers)} answers for {len(ask)} pairs")
            failed: dict[int, str] = {}
        except Exception:  # noqa: BLE001  (found pair by pair below)
            answers, failed = _judge_one_by_one(judge, *picked)
        for k, i in enumerate(ask):
            preferences[i] = answers[k]
            if k in failed:
                errors[i] = failed[k]
            elif not 0.0 <= answers[k] <= 1.0:  # NaN fails this too
                errors[i] = f"the judge returned {answers[k]}"
    return preferences, errors


def compare(judge: PairwiseJudge, prompts: Sequence[Prompt], model_responses: Sequence[str],
            baseline_responses: Sequence[str], *, seed: int = 0) -> list[Judged]:
    """Judge the model's response against the baseline's for each prompt, in a seeded random order per prompt."""
    if not len(prompts) == len(model_responses) == len(baseline_responses):
        raise ValueError("compare needs one model and one baseline response per prompt")
    order = model_first(len(prompts), seed)
    firsts = [m if f else b for m, b, f in zip(model_responses, baseline_responses, order)]
    seconds = [b if f else m for m, b, f in zip(model_responses, baseline_responses, order)]
    preferences, errors = judge_pairs(judge, prompts, firsts, seconds)
    return [Judged(f, p, None if i in errors else outcome(p, f), errors.get(i))
            for i, (f, p) in enumerate(zip(order, preferences))]
