"""The frontier statistics (dpokit.experiments.paper.frontier_stats) on hand-made points whose answers are known:
the hull, its bootstrap (seeds and samples resampled, deterministic), the per-band verdict, the standard-error check
and the report section that frontier_report.write_outputs writes from them."""

import json
import time

import numpy as np
import pytest

from dpokit.experiments.paper.frontier_report import LABELS, verdict, write_outputs
from dpokit.experiments.paper.frontier_stats import (DOMINATED, DOMINATES, LEVEL, band_edges, band_table,
                                                     band_verdict, bootstrap_hulls, compare_bands, hull_value,
                                                     merged, resample, se_check, se_sentence, upper_hull)


def _p(method, kl, reward, **knob):
    return {"method": method, "knob": knob, "kl": kl, "reward": reward}


def _sampled(method, kl, reward, rng, n=400, noise=0.02, kl_noise=0.05, **knob):
    """A point measured on `n` samples: scores around `reward`, KLs around `kl`, with their means and s.e."""
    scores = reward + noise * rng.standard_normal(n)
    kls = kl + kl_noise * rng.standard_normal(n)
    return {"method": method, "knob": knob, "reward": float(scores.mean()), "kl": float(kls.mean()),
            "reward_se": float(scores.std(ddof=1) / np.sqrt(n)), "positive_share": float((scores > 0.05).mean()),
            "samples": n, "kl_estimate": "sampled", "scores": scores.tolist(), "kls": kls.tolist()}


def _reference(rng, n=400, noise=0.02):
    ref = _sampled("sft", 0.0, 0.0, rng, n, noise, 0.0)
    ref["kl"] = 0.0
    return ref


# --- the hull --------------------------------------------------------------------------------------------------


def test_hull_of_known_points_is_concave_non_decreasing_and_starts_at_the_reference():
    points = [_p("dpo", 1.0, 0.5), _p("dpo", 2.0, 0.55), _p("dpo", 0.5, 0.2), _p("dpo", 3.0, 0.9),
              _p("dpo", 4.0, 0.8)]
    # (0.5, 0.2) and (2, 0.55) lie under the chords; (4, 0.8) is past the highest point: cut, the hull stays flat
    assert upper_hull(points, {"reward": 0.1}) == [(0.0, 0.1), (1.0, 0.5), (3.0, 0.9)]
    # without π_ref the hull starts at the point of least KL, and nothing is reached below it
    hull = upper_hull(points)
    assert hull == [(0.5, 0.2), (1.0, 0.5), (3.0, 0.9)]
    assert np.isnan(hull_value(hull, 0.2))
    # a sampled KL below 0 counts as 0; the higher of two points at one KL is kept
    assert upper_hull([_p("dpo", -0.05, 0.15), _p("dpo", 1.0, 0.2)], {"reward": 0.1}) == [(0.0, 0.15), (1.0, 0.2)]
    assert upper_hull([]) == [] and np.isnan(hull_value([], 1.0))


def test_hull_value_interpolates_and_is_flat_beyond_the_last_vertex():
    hull = [(0.0, 0.1), (1.0, 0.5), (3.0, 0.9)]
    assert hull_value(hull, 0.5) == pytest.approx(0.3)
    assert isinstance(hull_value(hull, 0.5), float)
    assert hull_value(hull, np.array([0.0, 2.0, 3.0, 50.0])) == pytest.approx([0.1, 0.7, 0.9, 0.9])


def test_hull_of_random_points_majorises_them_and_its_slopes_fall_but_stay_non_negative():
    rng = np.random.default_rng(3)
    for _ in range(20):
        points = [_p("ppo", float(k), float(r)) for k, r in zip(rng.uniform(0, 8, 15), rng.uniform(0, 1, 15))]
        hull = upper_hull(points, {"reward": 0.2})
        xs, ys = map(np.array, zip(*hull))
        slopes = np.diff(ys) / np.diff(xs)
        assert (slopes >= 0).all() and (np.diff(slopes) <= 1e-12).all()
        assert all(hull_value(hull, p["kl"]) >= p["reward"] - 1e-12 for p in points)
        assert hull_value(hull, 100.0) == pytest.approx(max(p["reward"] for p in points + [{"reward": 0.2}]))
        assert set(hull[1:]) <= {(p["kl"], p["reward"]) for p in points}


# --- the bootstrap ---------------------------------------------------------------------------------------------


def test_seeds_of_different_rewards_widen_the_interval():
    rng = np.random.default_rng(0)
    ref = _reference(rng)
    seeds = [_sampled("dpo", 1.0, r, rng, noise=0.01, kl_noise=0.0, beta=0.1, seed=s)
             for s, r in enumerate((0.2, 0.5, 0.8))]
    one = [_sampled("dpo", 1.0, 0.5, rng, noise=0.01, kl_noise=0.0, beta=0.1, seed=0)]
    assert merged(seeds) == [{"method": "dpo", "knob": {"beta": 0.1}, "reward": pytest.approx(0.5, abs=0.01),
                              "kl": pytest.approx(1.0), "seeds": 3}]
    assert hull_value(upper_hull(merged(seeds), ref), 1.0) == pytest.approx(0.5, abs=0.01)
    three_width = np.ptp(np.percentile(bootstrap_hulls(seeds, ref, [1.0])[:, 0], [2.5, 97.5]))
    one_width = np.ptp(np.percentile(bootstrap_hulls(one, ref, [1.0])[:, 0], [2.5, 97.5]))
    assert three_width > 0.2 and one_width < 0.01  # the seed spread (0.3) against the sample noise (0.0005)


def test_seeds_of_different_sizes_are_resampled_within_their_own_samples():
    seeds = [{**_p("ppo", 1.0, 0.2, seed=0), "scores": [0.2] * 100, "kls": [1.0] * 100},
             {**_p("ppo", 1.0, 0.8, seed=1), "scores": [0.8] * 300, "kls": [1.0] * 300}]
    values = bootstrap_hulls(seeds, {"reward": 0.0}, [1.0], rounds=200)[:, 0]
    assert set(np.round(values, 9)) == {0.2, 0.5, 0.8}  # both draws of one seed, or one of each
    # a seed of 4 samples is resampled 4 at a time, however many its sibling has: its mean spreads by 0.5 / √4
    seeds = [{**_p("ppo", 1.0, 0.5, seed=0), "scores": [0.0, 1.0] * 2, "kls": [1.0] * 4},
             {**_p("ppo", 1.0, 0.5, seed=1), "scores": [0.5] * 400, "kls": [1.0] * 400}]
    values = bootstrap_hulls(seeds, {"reward": 0.0}, [1.0], rounds=2000)[:, 0]
    # each of the two draws is that seed half the time (variance 0.25² / 4 then, 0 otherwise); their mean halves it
    assert np.std(values) == pytest.approx(np.sqrt(0.5 * 0.25 ** 2 / 2), rel=0.1)


def test_the_bootstrap_is_deterministic_for_a_seed():
    rng = np.random.default_rng(1)
    ref = _reference(rng)
    points = [_sampled("dpo", k, r, rng, beta=k) for k, r in ((0.5, 0.3), (2.0, 0.5))]
    grid = np.linspace(0, 3, 7)
    first = bootstrap_hulls(points, ref, grid, rounds=200, seed=4)
    assert first.shape == (200, 7)
    assert np.array_equal(first, bootstrap_hulls(points, ref, grid, rounds=200, seed=4))
    assert not np.array_equal(first, bootstrap_hulls(points, ref, grid, rounds=200, seed=5))
    both = points + [_sampled("ppo", 1.0, 0.4, rng, kl_coef=0.1)]
    assert compare_bands(both, ref, rounds=200, seed=4) == compare_bands(both, ref, rounds=200, seed=4)


def test_a_hundred_points_of_512_samples_take_seconds():
    rng = np.random.default_rng(2)
    ref = _reference(rng, n=512)
    points = [_sampled(m, 0.4 * (c + 1), 0.1 * np.log1p(c), rng, n=512, beta=c, seed=s)
              for m in ("dpo", "ppo") for c in range(17) for s in range(3)]
    started = time.monotonic()
    assert len(compare_bands(points[:100], ref, rounds=1000)) == 4  # 0–1, 1–3, 3–6, 6–6.8
    assert time.monotonic() - started < 4.0  # about 1 s alone on one core


# --- the verdict per band --------------------------------------------------------------------------------------


def _better_above_3(rng, noise=0.02, n=400):
    """DPO and PPO with the same points (the same samples) up to KL 1; PPO well above beyond 3 nats; PPO-GT a copy
    of PPO."""
    shared = [_sampled("dpo", k, r, rng, n, noise, step=k) for k, r in ((0.5, 0.3), (1.0, 0.45))]
    dpo = shared + [_sampled("dpo", k, r, rng, n, noise, step=k) for k, r in ((2.0, 0.5), (4.0, 0.55), (6.0, 0.58))]
    ppo = [{**p, "method": "ppo"} for p in shared]
    ppo += [_sampled("ppo", k, r, rng, n, noise, step=k) for k, r in ((2.0, 0.6), (4.0, 0.8), (6.0, 0.9))]
    return dpo + ppo + [{**p, "method": "ppo-gt"} for p in ppo]


def test_a_method_clearly_better_in_one_band_dominates_there_and_is_level_where_equal():
    rng = np.random.default_rng(0)
    ref = _reference(rng)
    result = compare_bands(_better_above_3(rng), ref, bands=(0, 1, 3, 6))
    low, high = result[0], result[2]
    assert (low["kl_from"], low["kl_to"], high["kl_from"], high["kl_to"]) == (0.0, 1.0, 3.0, 6.0)
    pairs = {(p["a"], p["b"]): p for p in high["pairs"]}
    assert pairs["dpo", "ppo"]["verdict"] == DOMINATED and pairs["dpo", "ppo-gt"]["verdict"] == DOMINATED
    # the hulls' gap grows from 0.175 at KL 3 to 0.25 at 4 and 0.32 at 6: a mean of 0.261
    assert pairs["dpo", "ppo"]["difference"] == pytest.approx(-0.261, abs=0.01)
    assert pairs["dpo", "ppo"]["high"] < 0
    assert pairs["ppo", "ppo-gt"]["verdict"] == LEVEL  # a copy: level with its original
    assert high["top"] == ["ppo", "ppo-gt"]  # level with each other, dominating the rest
    assert [p["verdict"] for p in low["pairs"]] == [LEVEL] * 3 and low["top"] == ["dpo", "ppo", "ppo-gt"]
    text = band_verdict(result, LABELS)
    assert text.count("\n") == 2
    assert "- KL 3–6 nats: PPO dominates DPO (+0.2" in text and "PPO and PPO-GT are on top" in text
    assert text.startswith("- KL 0–1 nats: DPO and PPO are level within noise (") and "all are level" in text
    table = band_table(result, LABELS)
    assert "| KL band | DPO | PPO | PPO-GT | on top |" in table and "| 3–6 | DPO vs PPO | -0.2" in table
    assert f"| DPO {DOMINATED} PPO |" in table and f"| {LEVEL} |" in table


def test_large_noise_leaves_the_same_gap_level_within_noise():
    rng = np.random.default_rng(0)
    result = compare_bands(_better_above_3(rng, noise=3.0, n=20), _reference(rng), bands=(0, 1, 3, 6))
    assert {p["verdict"] for band in result for p in band["pairs"]} == {LEVEL}


def test_hulls_that_cross_are_not_called_dominant():
    rng = np.random.default_rng(0)
    # A's hull is the chord to (4, 1.2): 0.2 below B's at KL 1, 0.6 above at KL 4; its band mean is higher
    points = [_sampled("dpo", 1.0, 0.2, rng, noise=0.01, kl_noise=0.0, beta=1.0),
              _sampled("dpo", 4.0, 1.2, rng, noise=0.01, beta=0.1),
              _sampled("ppo", 1.0, 0.5, rng, noise=0.01, kl_noise=0.0, kl_coef=1.0),
              _sampled("ppo", 4.0, 0.6, rng, noise=0.01, kl_coef=0.1)]
    [band] = compare_bands(points, _reference(rng, noise=0.01), bands=(0, 4))
    [pair] = band["pairs"]
    assert pair["low"] > 0.08 and pair["difference"] == pytest.approx(0.125, abs=0.01)
    assert pair["verdict"] == LEVEL and pair["crossing"] and band["top"] == []
    assert "DPO and PPO cross" in band_verdict([band], LABELS)
    assert f"| {LEVEL} (crossing) |" in band_table([band], LABELS)
    # and without the dip below B, the same means are a domination
    points[0] = _sampled("dpo", 1.0, 0.55, rng, noise=0.01, kl_noise=0.0, beta=1.0)
    [band] = compare_bands(points, _reference(rng, noise=0.01), bands=(0, 4))
    assert band["pairs"][0]["verdict"] == DOMINATES and band["top"] == ["dpo"]


def test_default_bands_end_at_the_largest_kl_and_one_method_is_no_comparison():
    points = [_p("dpo", 0.5, 0.3), _p("ppo", 7.5, 0.9), _p("best-of-n", 20.0, 0.9)]
    assert band_edges(points) == [0.0, 1.0, 3.0, 6.0, 7.5]
    assert band_edges([_p("dpo", 2.0, 0.3)]) == [0.0, 1.0, 2.0]
    assert band_edges([_p("dpo", 6.2, 0.3)]) == [0.0, 1.0, 3.0, 6.2]  # no 6–6.2 sliver
    assert band_edges([_p("dpo", -0.01, 0.3)]) == []
    assert compare_bands(points[:1] + points[2:], {"reward": 0.0}) == []


# --- standard errors -------------------------------------------------------------------------------------------


def test_points_near_the_frontier_with_a_large_standard_error_are_named():
    ref = {"reward": 0.0}
    points = [{**_p("dpo", 1.0, 0.5, beta=0.1), "reward_se": 0.02},  # on DPO's hull, too noisy
              {**_p("dpo", 1.0, 0.3, beta=2.0), "reward_se": 0.02},  # 10 s.e. under both hulls: not near
              {**_p("ppo", 1.0, 0.52, kl_coef=0.1), "reward_se": 0.005},  # on PPO's hull, precise
              {**_p("preferred-ft", 1.0, 0.49, step=50), "reward_se": 0.008}]  # within 2 s.e. of DPO's hull
    check = se_check(points, ref)
    assert check["near"] == 3 and not check["holds"]
    assert check["over"] == [{"method": "dpo", "knob": {"beta": 0.1}, "reward": 0.5, "reward_se": 0.02, "kl": 1.0}]
    assert "1 of the 3 points near the frontier" in se_sentence(check, LABELS)
    assert "DPO beta=0.1 (± 0.020 at KL 1.00)" in se_sentence(check, LABELS)
    points[0]["reward_se"] = 0.01
    assert se_check(points, ref)["holds"] and "the requirement holds" in se_sentence(se_check(points, ref))


# --- the report ------------------------------------------------------------------------------------------------


def _frontier(points, ref):
    ref = {**ref, "positive_share": 0.5}
    return {"points": points, "reference": ref, "skipped": {}, "judge": "vader", "sizes": "custom", "seed": 0,
            "seconds": {"dpo": 1.0, "ppo": 1.0, "total": 2.0}, "machine": "test machine"}


def test_write_outputs_adds_the_frontier_statistics_section(tmp_path):
    rng = np.random.default_rng(0)
    ref = _reference(rng)
    points = [p for p in _better_above_3(rng) if p["method"] != "ppo-gt"]
    write_outputs(tmp_path, _frontier(points, ref))
    report = (tmp_path / "report.md").read_text()
    saved = json.loads((tmp_path / "frontier.json").read_text())
    bands = compare_bands(points, ref, ("dpo", "ppo"), seed=0)
    assert saved["bands"] == json.loads(json.dumps(bands))  # the default bands, the frontier's seed
    assert [(b["kl_from"], b["kl_to"]) for b in saved["bands"]] == [(0, 1), (1, 3), (3, pytest.approx(6, abs=0.01))]
    assert saved["standard_errors"]["holds"]
    assert report.index("## Verdict") < report.index("## Frontier statistics") < report.index("## Points")
    assert verdict(points) in report  # the point-by-point verdict is kept
    assert band_verdict(bands, LABELS) in report and band_table(bands, LABELS) in report
    assert "Standard errors: All " in report and "![frontier hulls](frontier_hulls.png)" in report
    assert (tmp_path / "frontier_hulls.png").stat().st_size > 5_000


def test_write_outputs_without_two_compared_methods_has_no_statistics(tmp_path):
    rng = np.random.default_rng(0)
    points = [p for p in _better_above_3(rng) if p["method"] == "dpo"]
    write_outputs(tmp_path, _frontier(points, _reference(rng)))
    assert "## Frontier statistics" not in (tmp_path / "report.md").read_text()
    assert "bands" not in json.loads((tmp_path / "frontier.json").read_text())
    assert not (tmp_path / "frontier_hulls.png").exists()


def test_resample_draws_each_method_independently_of_the_others():
    rng = np.random.default_rng(0)
    ref = _reference(rng)
    points = _better_above_3(rng)
    alone = resample(points, ref, ("dpo",), rounds=50)
    together = resample(points, ref, ("dpo", "ppo"), rounds=50)
    assert np.array_equal(alone.reward["dpo"], together.reward["dpo"])
    assert np.array_equal(alone.reference, together.reference)
    # the points DPO and PPO share are resampled differently: their differences carry the noise of both
    assert not np.array_equal(together.reward["dpo"][:, :2], together.reward["ppo"][:, :2])


def test_write_outputs_says_so_when_no_compared_method_moved_from_the_reference(tmp_path):
    rng = np.random.default_rng(0)
    points = [_sampled(m, -0.01, 0.0, rng, kl_noise=0.001, step=1) for m in ("dpo", "ppo")]
    write_outputs(tmp_path, _frontier(points, _reference(rng)))
    assert "No compared method moved from π_ref" in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "frontier.json").read_text())["bands"] == []
