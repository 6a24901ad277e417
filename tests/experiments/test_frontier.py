"""The reward–KL frontier sweep (dpokit.experiments.paper.frontier): the dominance verdict on hand-made points, Best-of-N's KL
bound, and a micro sweep on the tiny test model writing frontier.json, frontier.png and report.md."""

import json
import math
from dataclasses import replace

import pytest

from dpokit.experiments.paper.frontier_report import dominates, pareto_front, undominated, verdict

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: extra threads only contend (conftest.py)


def _p(method, reward, kl, **knob):
    return {"method": method, "knob": knob, "reward": reward, "kl": kl}


def test_dominance_needs_at_least_the_reward_at_no_more_kl():
    assert dominates(_p("dpo", 0.5, 1.0), _p("ppo", 0.5, 1.0))  # ties dominate
    assert dominates(_p("dpo", 0.6, 0.9), _p("ppo", 0.5, 1.0))
    assert not dominates(_p("dpo", 0.6, 1.1), _p("ppo", 0.5, 1.0))  # more reward, but at more KL
    assert not dominates(_p("dpo", 0.4, 0.5), _p("ppo", 0.5, 1.0))


def test_verdict_says_dominates_when_every_ppo_point_is_matched():
    dpo = [_p("dpo", 0.3, 1.0, beta=1.0), _p("dpo", 0.7, 3.0, beta=0.1)]
    ppo = [_p("ppo", 0.25, 1.5, kl_coef=0.3), _p("ppo", 0.6, 3.0, kl_coef=0.03)]
    text = verdict(dpo + ppo)
    assert text.startswith("DPO's frontier dominates PPO's: each of the 2 PPO points")
    assert "Highest mean reward reached: DPO 0.700 (at KL 3.00), PPO 0.600 (at KL 3.00)." in text


def test_verdict_names_the_ppo_points_left_undominated():
    dpo = [_p("dpo", 0.3, 1.0, beta=1.0), _p("dpo", 0.7, 3.0, beta=0.1)]
    ppo = [_p("ppo", 0.5, 1.2, kl_coef=0.3), _p("ppo", 0.6, 3.5, kl_coef=0.03)]
    assert undominated(ppo, dpo) == [ppo[0]]
    text = verdict(dpo + ppo + [_p("unlikelihood", 0.1, 2.0, step=50)])
    assert text.startswith("DPO's frontier does not dominate PPO's: 1 of the 2 PPO points have no DPO point")
    assert "kl_coef=0.3 (reward 0.500 at KL 1.20; DPO's best at no more KL: 0.300 ± 0.000)" in text
    assert "each of the 1 Unlikelihood points has a DPO point" in text


def test_verdict_without_ppo_says_why():
    text = verdict([_p("dpo", 0.3, 1.0)], {"ppo": "dpokit.experiments.paper.ppo not available"})
    assert text.startswith("There are no PPO points (dpokit.experiments.paper.ppo not available)")


def test_pareto_front_keeps_the_undominated_points_by_kl():
    points = [_p("dpo", 0.3, 1.0), _p("dpo", 0.2, 2.0), _p("dpo", 0.7, 3.0), _p("dpo", 0.7, 4.0)]
    assert pareto_front(points) == [points[0], points[2]]


def test_best_of_n_kl_bound():
    from dpokit.experiments.paper.methods import best_of_n_bound

    assert best_of_n_bound(1) == 0.0
    assert best_of_n_bound(4) == pytest.approx(math.log(4) - 0.75)


def test_unknown_method_is_a_one_line_error(capsys):
    from dpokit.cli.main import main

    assert main(["reproduce", "sentiment", "--output", "x", "--methods", "dpo,rlhf"]) == 2
    assert "--methods: unknown rlhf" in capsys.readouterr().err


@pytest.mark.slow
def test_a_directory_in_use_or_holding_a_sweep_is_refused_untouched(tmp_path, capsys):
    from dpokit.cli.main import main
    from dpokit.train.rundir import LOCK

    held = tmp_path / "held"
    held.mkdir()
    (held / "frontier.json").write_text("{}")
    assert main(["reproduce", "sentiment", "--output", str(held), "--sizes", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run (frontier.json)" in err and "--overwrite" in err and "--resume" not in err
    assert [p.name for p in held.iterdir()] == ["frontier.json"]
    busy = tmp_path / "busy"
    busy.mkdir()
    import os
    import socket
    (busy / LOCK).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": 0}))
    assert main(["reproduce", "sentiment", "--output", str(busy), "--sizes", "tiny", "--overwrite"]) == 2
    assert "in use by another run" in capsys.readouterr().err


def test_micro_sweep_writes_the_frontier(tiny_model_dir, tmp_path):
    from dpokit.experiments.paper.frontier import METHODS, SIZES, run_frontier

    tiny = SIZES["tiny"]
    # the random tiny model writes no sentiment for VADER to tell apart: the judge is the text's length
    sizes = replace(tiny, demo=replace(tiny.demo, model=tiny_model_dir, judge="builtins:len"))
    frontier = run_frontier(str(tmp_path / "out"), sizes, threads=1, log=lambda *_: None)
    saved = json.loads((tmp_path / "out" / "frontier.json").read_text())
    assert saved["points"] == frontier["points"] and saved["skipped"] == {}
    counts = {m: sum(p["method"] == m for p in saved["points"]) for m in METHODS}
    assert counts == {"dpo": len(tiny.dpo_betas) * tiny.dpo_steps,  # a point per checkpoint (save_every 1)
                      "preferred-ft": tiny.baseline_steps, "unlikelihood": tiny.baseline_steps,
                      "ppo": len(tiny.ppo_kl_coefs), "ppo-gt": len(tiny.ppo_kl_coefs), "best-of-n": len(tiny.best_of_n),
                      # online DPO: a point per round and β, each labelling variant
                      "dpo-online": len(tiny.online_betas) * tiny.online_rounds,
                      "dpo-online-gt": len(tiny.online_betas) * tiny.online_rounds}
    for p in saved["points"]:
        assert p["reward"] > 0 and math.isfinite(p["kl"])
        assert p["kl_estimate"] == ("sampled" if p["method"] != "best-of-n" else "analytic bound log N - (N-1)/N")
    assert [p["kl"] for p in saved["points"] if p["method"] == "best-of-n"] == [0.0, pytest.approx(math.log(2) - 0.5)]
    assert saved["reference"]["kl"] == 0.0
    assert (tmp_path / "out" / "frontier.png").stat().st_size > 5_000
    report = (tmp_path / "out" / "report.md").read_text()
    assert verdict(saved["points"], saved["skipped"]) in report
    assert not list((tmp_path / "out" / "dpo").glob("*/checkpoint-*"))  # measured, then deleted; final/ stays
    assert (tmp_path / "out" / "dpo" / "beta-0.5" / "final").is_dir()


def test_reproduce_options_are_one_config_checked_at_parse_time(tmp_path, capsys):
    from dpokit.cli.main import build_parser, main
    from dpokit.cli.options import config_from_args
    from dpokit.config.experiments import SWEEPS, ReproduceConfig
    from dpokit.experiments.paper.frontier import SIZES

    assert tuple(SIZES) == SWEEPS  # --sizes offers every sweep there is
    run = tmp_path / "run.yaml"
    run.write_text("experiment: sentiment\noutput: out\nsizes: tiny\nmethods: dpo,ppo\n")
    config = config_from_args(build_parser().parse_args(["reproduce", "--config", str(run), "--seed", "3"]))
    assert config == ReproduceConfig(experiment="sentiment", output="out", sizes="tiny", methods="dpo,ppo", seed=3)
    assert (config.sweep(), config.method_list()) == ("tiny", ("dpo", "ppo"))
    for flags, message in ((["--threads", "0"], "--threads must be at least 1; got 0"),
                           (["--quick", "--sizes", "tiny"], "--quick and --sizes tiny contradict each other"),
                           (["--methods", ","], "--methods: unknown (none given)")):
        assert main(["reproduce", "sentiment", "--output", str(tmp_path / "o"), *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists()
