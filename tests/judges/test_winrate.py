"""Win-rate arithmetic, the bootstrap interval, order randomisation and judge failures (dpokit/winrate.py), and
pointwise judges made pairwise and judge templates (dpokit/pairwise.py). No models here: see
judges/test_winrate_run.py and judges/test_llm.py."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dpokit.errors import ConfigError
from dpokit.judges.pairwise import DEFAULT_TEMPLATE, fill_template, from_pointwise, pointwise_text, prompt_text, read_template
from dpokit.judges.loader import load_pairwise_judge
from dpokit.judges.winrate import Judged, bootstrap_ci, compare, judge_pairs, model_first, outcome, summarise, win_rate


def test_win_rate_of_a_hand_case_counts_ties_as_half():
    # preference for the response shown first, and whether the model's was first
    cases = [(1.0, True), (0.0, True), (0.5, False), (0.9, False), (0.2, False), (0.5000001, True)]
    outcomes = [outcome(p, f) for p, f in cases]
    assert outcomes == [1.0, 0.0, 0.5, 0.0, 1.0, 0.5]  # 0.5000001 is within the tie tolerance
    judged = [Judged(f, p, o) for (p, f), o in zip(cases, outcomes)] + [Judged(True, math.nan, None, "boom")]
    summary = summarise(judged, resamples=200)
    assert summary["win_rate"] == pytest.approx((2 + 2 * 0.5) / 6) == win_rate(outcomes)
    assert (summary["wins"], summary["losses"], summary["ties"], summary["n"], summary["skipped"]) == (2, 2, 2, 6, 1)
    with pytest.raises(ConfigError, match="no prompt was judged"):
        summarise([Judged(True, math.nan, None, "boom")])


def test_bootstrap_interval_brackets_the_estimate_matches_the_normal_one_and_is_seeded():
    outcomes = [1.0] * 240 + [0.0] * 140 + [0.5] * 20  # win rate 0.625
    low, high = bootstrap_ci(outcomes, resamples=2000, seed=3)
    assert low < win_rate(outcomes) < high
    # the percentile bootstrap of a mean is close to the normal interval mean ± 1.96·sd/√n
    half = 1.96 * np.std(outcomes) / math.sqrt(len(outcomes))
    assert low == pytest.approx(0.625 - half, abs=0.006) and high == pytest.approx(0.625 + half, abs=0.006)
    assert bootstrap_ci(outcomes, resamples=2000, seed=3) == (low, high)
    assert bootstrap_ci(outcomes, resamples=2000, seed=4) != (low, high)
    narrow = bootstrap_ci(outcomes, resamples=2000, seed=3, confidence=0.5)
    assert low < narrow[0] < narrow[1] < high
    assert bootstrap_ci([1.0, 1.0, 1.0], resamples=50) == (1.0, 1.0)
    with pytest.raises(ConfigError, match="0 < confidence < 1"):
        bootstrap_ci(outcomes, confidence=1.0)


def _first_always_wins(prompts, firsts, seconds):
    return [1.0] * len(prompts)


def test_the_order_is_random_per_prompt_so_a_position_biased_judge_gives_one_half():
    order = model_first(400, seed=0)
    assert order == model_first(400, seed=0) and order != model_first(400, seed=1)
    assert 0.4 < sum(order) / 400 < 0.6
    prompts = [f"p{i}" for i in range(400)]
    judged = compare(_first_always_wins, prompts, ["mine"] * 400, ["theirs"] * 400, seed=0)
    assert [j.model_first for j in judged] == order
    assert summarise(judged)["win_rate"] == pytest.approx(sum(order) / 400)  # ~0.5: wins exactly when shown first
    # a judge that reads the responses is not fooled by the order
    likes_mine = from_pointwise(lambda texts: [float(t.endswith("mine")) for t in texts])
    assert summarise(compare(likes_mine, prompts, ["mine"] * 400, ["theirs"] * 400, seed=0))["win_rate"] == 1.0


def test_judge_failures_are_found_pair_by_pair_and_identical_responses_tie_unasked():
    asked = []

    def fragile(prompts, firsts, seconds):
        asked.append(len(prompts))
        if any("boom" in p for p in prompts):
            raise RuntimeError("cannot read this")
        return [math.nan if "nan" in p else 0.8 for p in prompts]

    prompts = ["ok", "boom", "nan", "same", "ok too"]
    firsts = ["a", "b", "c", "x", "e"]
    seconds = ["f", "g", "h", "x", "i"]
    preferences, errors = judge_pairs(fragile, prompts, firsts, seconds)
    assert asked == [4, 1, 1, 1, 1]  # one batch without the identical pair, then pair by pair
    assert errors == {1: "RuntimeError: cannot read this", 2: "the judge returned nan"}
    assert preferences[0] == preferences[4] == 0.8 and preferences[3] == 0.5
    judged = compare(fragile, prompts, firsts, seconds, seed=0)
    assert [j.outcome is None for j in judged] == [False, True, True, False, False]
    assert judged[3].outcome == 0.5
    _, errors = judge_pairs(lambda p, a, b: [2.0] * len(p), ["q"], ["a"], ["b"])
    assert errors == {0: "the judge returned 2.0"}


def test_pointwise_judges_made_pairwise():
    by_length = from_pointwise(lambda texts: [float(len(t)) for t in texts])
    assert by_length(["x", "x", "x"], ["long", "s", "ab"], ["s", "long", "cd"]) == [1.0, 0.0, 0.5]
    with_nan = from_pointwise(lambda texts: [math.nan if "?" in t else 1.0 for t in texts])
    assert math.isnan(with_nan(["q"], ["?"], ["fine"])[0])
    # plain text: the continuation follows its prompt; chat: the conversation, then the reply
    assert pointwise_text("The film was", " great") == "The film was great"
    chat = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"}]
    assert pointwise_text(chat, "hello") == "system: be kind\n\nuser: hi\n\nassistant: hello"
    assert prompt_text([{"role": "user", "content": "hi"}]) == "hi"
    class GivenPrompt:  # a judge that scores a response given its prompt, as the implicit reward does
        def __call__(self, texts):
            raise AssertionError("whole texts are not what this judge scores")

        def continuations(self, prompts, responses):
            return [float(len(r)) if p == "q" else 0.0 for p, r in zip(prompts, responses)]

    assert from_pointwise(GivenPrompt())(["q", chat], ["long", "long"], ["s", "s"]) == [1.0, 0.5]
    vader = load_pairwise_judge("vader")
    assert vader(["The film was"], [" wonderful and great"], [" awful and boring"]) == [1.0]


def test_templates_are_filled_in_one_pass_and_checked(tmp_path):
    assert "{prompt}" in DEFAULT_TEMPLATE and "{response_a}" in DEFAULT_TEMPLATE and "{response_b}" in DEFAULT_TEMPLATE
    filled = fill_template("Q {prompt} A {response_a} B {response_b} {other}", "q", "say {response_b}", "b")
    assert filled == "Q q A say {response_b} B b {other}"
    good = tmp_path / "t.txt"
    good.write_text("Which is better for {prompt}?\n1: {response_a}\n2: {response_b}\nAnswer A or B.")
    assert read_template(good).startswith("Which is better")
    bad = tmp_path / "bad.txt"
    bad.write_text("{prompt} {response_a}")
    with pytest.raises(ConfigError, match=r"missing placeholder \{response_b\}"):
        read_template(bad)
    with pytest.raises(ConfigError, match="no such file"):
        read_template(tmp_path / "missing.txt")
    with pytest.raises(ConfigError, match="--judge-template is for an llm:PATH judge"):
        load_pairwise_judge("vader", template="x")
    with pytest.raises(ConfigError, match="expected 'llm:PATH'"):
        load_pairwise_judge("llm:")
    with pytest.raises(ConfigError, match="--judge llm:.*no such"):
        load_pairwise_judge(f"llm:{tmp_path}/no/such/judge")


def test_winrate_options_are_one_config_checked_at_parse_time(tmp_path, capsys):
    from dpokit.cli.main import build_parser, main
    from dpokit.cli.options import config_from_args
    from dpokit.config.winrate import WinrateConfig

    base = ["winrate", "--model", "a", "--baseline", "b", "--prompts", "p.txt", "--judge", "vader"]
    config = config_from_args(build_parser().parse_args(base))
    assert config.temperature_list() == [1.0] and (config.both_orders, config.chat_template) == (True, None)
    assert WinrateConfig(model="a", baseline="b", prompts="p", judge="j", temperatures="0.5,1",
                         output="o").temperature_list() == [0.5, 1.0]
    for flags, message in ((["--confidence", "1"], "--confidence must be in (0, 1); got 1.0"),
                           (["--resamples", "0"], "--resamples must be at least 1; got 0"),
                           (["--temperature", "-1"], "--temperature must not be negative; got -1.0"),
                           (["--top-p", "nan"], "--top-p must be in (0, 1]; got nan"),
                           (["--temperatures", "1,inf", "--output", "o"], "--temperatures needs distinct numbers"),
                           (["--temperatures", "0.5,1"], "--temperatures draws a plot: give --output DIR")):
        assert main([*base, *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("dpokit winrate: error: ") and message in err[0], err
    with pytest.raises(SystemExit):
        main([*base, "--temperature", "0.5", "--temperatures", "0.5,1"])
    assert "not allowed with argument --temperature" in capsys.readouterr().err
