"""Online DPO on the frontier (dpokit.experiments.paper.online) on the tiny test model: a point per round and β with
its knobs and cumulative sample budget, each round starting from the previous round's policy against π_ref,
labels from the judge of the variant, checkpoints deleted, and the error for an unknown kind of labels."""

import json
from dataclasses import replace

import pytest
import yaml
from safetensors.torch import load_file

from dpokit.errors import ConfigError

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: extra threads only contend (conftest.py)


@pytest.fixture(scope="module")
def task(tiny_model_dir, tmp_path_factory):
    """The tiny sweep's task (π_ref after 2 SFT steps, its pairs), judged by the text's length: the random tiny
    model writes no sentiment for VADER to tell apart."""
    from dpokit.experiments.paper.task import SIZES, prepare_task

    tiny = SIZES["tiny"]
    sizes = replace(tiny, demo=replace(tiny.demo, model=tiny_model_dir, judge="builtins:len"))
    return prepare_task(tmp_path_factory.mktemp("online"), sizes, seed=0, threads=1, log=lambda *_: None)


@pytest.fixture(scope="module")
def runs(task):
    """Both variants run once on the task, with what each logged."""
    from dpokit.experiments.paper.online import dpo_online_points

    out = {}
    for labels in ("ground-truth", "learned"):
        lines = []
        task.log = lines.append
        out[labels] = (dpo_online_points(task, labels), lines)
    task.log = lambda *_: None
    return out


def _weights(model_dir) -> dict:
    return load_file(str(model_dir / "model.safetensors"))


def _differ(a: dict, b: dict) -> bool:
    return any(not a[name].equal(b[name]) for name in a)


def test_unknown_labels_are_a_config_error(task):
    from dpokit.experiments.paper.online import dpo_online_points

    with pytest.raises(ConfigError, match="online DPO labels must be one of 'learned', 'ground-truth'; got 'human'"):
        dpo_online_points(task, "human")
    assert not (task.out / "dpo-online").exists() and not (task.out / "dpo-online-gt").exists()


@pytest.mark.slow
@pytest.mark.parametrize("labels, method", [("ground-truth", "dpo-online-gt"), ("learned", "dpo-online")])
def test_a_point_per_round_and_beta_with_the_cumulative_budget(task, runs, labels, method):
    sizes = task.sizes
    points, lines = runs[labels]
    assert [(p["method"], p["knob"]) for p in points] == [
        (method, {"beta": beta, "round": r}) for beta in sizes.online_betas for r in range(1, sizes.online_rounds + 1)]
    per_round = len(task.train_prompts) * sizes.demo.completions
    assert per_round == 16 * 3 and task.pair_samples == 48  # the tiny sizes: 16 prompts, 3 completions each
    for p in points:
        drawn = p["knob"]["round"] * per_round
        expected = {"samples_drawn": drawn, "judge_calls": drawn, "reward_model_calls": 0} if labels == "ground-truth" \
            else {"samples_drawn": drawn, "judge_calls": task.pair_samples, "reward_model_calls": drawn}
        assert {k: p[k] for k in expected} == expected
        assert p["kl_estimate"] == "sampled" and len(p["scores"]) == len(p["kls"]) == len(task.held_out)
    progress = [line for line in lines if " round " in line and " pairs " in line]
    assert len(progress) == len(points)
    assert progress[0].strip().startswith(f"{method} β=0.5 round 1/2: ")
    assert f"reward {points[0]['reward']:.3f}, KL {points[0]['kl']:.2f}, 48 samples drawn" in progress[0]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dpo-online-gt", "dpo-online"])
def test_each_round_starts_from_the_last_against_pi_ref(task, runs, method):
    from pathlib import Path

    root = task.out / method / "beta-0.5"
    given = [yaml.safe_load((root / f"round-{r:03d}" / "model" / "run_config.yaml").read_text()) for r in (1, 2)]
    assert given[0]["model"] == task.sft_dir and given[0]["ref_model"] is None  # round 1: π_ref is its own reference
    assert given[1]["model"] == str(root / "round-001" / "model" / "final") and given[1]["ref_model"] == task.sft_dir
    assert [g["max_steps"] for g in given] == [task.sizes.online_steps] * 2
    assert [g["seed"] for g in given] == [0, 1000]  # round_seed(0, r)
    assert all(g["beta"] == 0.5 and g["lr"] == task.sizes.dpo_lr and g["batch_size"] == task.sizes.batch_size
               and g["max_length"] == 128 and g["max_prompt_length"] == 16 and g["precompute_ref"] for g in given)
    reference = _weights(Path(task.sft_dir))
    first, second = (_weights(root / f"round-{r:03d}" / "model" / "final") for r in (1, 2))
    assert _differ(first, reference) and _differ(second, first) and _differ(second, reference)
    for r in (1, 2):
        model = root / f"round-{r:03d}" / "model"
        assert (model / "final").is_dir() and not list(model.glob("checkpoint-*"))  # measured, then deleted


@pytest.mark.slow
def test_pairs_are_labelled_by_the_variants_judge(task, runs):
    from dpokit.experiments.paper.methods import learned_reward

    gap = task.sizes.demo.min_score_gap
    for r in (1, 2):
        rows = [json.loads(line) for line in (task.out / "dpo-online-gt" / "beta-0.5" / f"round-{r:03d}" /
                                              "pairs.jsonl").read_text().splitlines()]
        assert rows and all(len(x["prompt"] + x["chosen"]) >= len(x["prompt"] + x["rejected"]) + gap for x in rows)
    assert task.reward_model is not None  # fitted by the learned variant's run, once: not again here
    reward = learned_reward(task)
    rows = [json.loads(line) for line in (task.out / "dpo-online" / "beta-0.5" / "round-002" /
                                          "pairs.jsonl").read_text().splitlines()]
    chosen = reward([x["prompt"] + x["chosen"] for x in rows])
    rejected = reward([x["prompt"] + x["rejected"] for x in rows])
    assert rows and all(c >= r + gap - 1e-4 for c, r in zip(chosen, rejected))
    # round 1 samples π_ref with the sweep's seed: the ground truth labels the sweep's own pairs again
    first = (task.out / "dpo-online-gt" / "beta-0.5" / "round-001" / "pairs.jsonl").read_text()
    assert first == (task.out / "pairs.jsonl").read_text()
