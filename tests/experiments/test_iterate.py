"""`dpokit iterate` on a tiny random model: rounds chain, the reference option is honoured, a resumed run
recomputes only the missing round and gets the same result, and a bad judge is a one-line error."""

import json
import math
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file

from dpokit.cli.main import main
from dpokit.errors import ConfigError, DpokitError
from dpokit.experiments.iterate import judge_scores, sample_and_label
from helpers import make_mistral
from dpokit.config.experiments import IterateConfig, round_seed
from dpokit.experiments.iterate_run import MARKER, run_iterate
from dpokit.judges.loader import load_judge
from dpokit.data.prompts import read_prompts

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: extra threads only contend (conftest.py)


def length_judge(text: str) -> float:
    """Longer is better: continuations of a random model differ in length, so most pairs are not ties."""
    return len(text) / 10


def nan_judge(text: str) -> float:
    return math.nan if "the" in text else 1.0


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompts")
    (root / "train.txt").write_text("the film\nI loved the\nthe plot was\nthe acting is\nwe watched\nit was very\n")
    (root / "eval.jsonl").write_text('"the music"\n{"prompt": "this movie"}\n"you saw"\n')
    return {"train": str(root / "train.txt"), "eval": str(root / "eval.jsonl")}


def config(model, prompts, output, **overrides) -> IterateConfig:
    values = dict(model=model, prompts=prompts["train"], eval_prompts=prompts["eval"], output=str(output), rounds=2,
                  samples_per_prompt=3, judge="test_iterate:length_judge", steps=2, batch_size=4, warmup_steps=0,
                  lr=1e-2, eval_samples=2, max_new_tokens=6, max_length=64, max_prompt_length=32, threads=1)
    values.update(overrides)
    return IterateConfig(**values)


@pytest.fixture(scope="module")
def runs(tiny_model_dir, prompt_files, tmp_path_factory):
    """A 2-round run with --reference previous, and its round 2 redone with --reference fixed (round 1 does not
    depend on the option: its reference is the starting model either way, and it is kept to save time)."""
    root = tmp_path_factory.mktemp("iterate")
    torch.set_num_threads(1)
    quiet = dict(log=lambda *_: None)
    out = {"previous": (root / "previous", run_iterate(config(tiny_model_dir, prompt_files, root / "previous",
                                                              reference="previous"), **quiet))}
    for name in ("round-000", "round-001"):
        shutil.copytree(root / "previous" / name, root / "fixed" / name)
    out["fixed"] = (root / "fixed", run_iterate(config(tiny_model_dir, prompt_files, root / "fixed", reference="fixed",
                                                       resume=True), **quiet))
    return out


def first_step(run_dir, number):
    rows = [json.loads(line) for line in (run_dir / f"round-{number:03d}" / "model" / "metrics.jsonl").open()]
    return next(r for r in rows if r.get("split") == "train" and r["step"] == 1)


def weights(run_dir, number):
    return load_file(str(run_dir / f"round-{number:03d}" / "model" / "final" / "model.safetensors"))


@pytest.mark.slow
def test_each_round_starts_from_the_previous_rounds_model(runs, tiny_model_dir, prompt_files, tokenizer):
    from dpokit.models.loading import load_model

    run_dir, summary = runs["previous"]
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    assert summary["rounds"][1]["started_from"] == tiny_model_dir
    assert summary["rounds"][2]["started_from"] == str(run_dir / "round-001" / "model" / "final")
    # round 2's pairs are exactly what round 1's model samples with round 2's seed
    settings = config(tiny_model_dir, prompt_files, run_dir).round_settings()
    train = read_prompts(prompt_files["train"])
    seed = round_seed(0, 2)
    again = sample_and_label(load_model(str(run_dir / "round-001" / "model" / "final")), tokenizer,
                             load_judge("test_iterate:length_judge"), train, settings, seed, random.Random(seed),
                             "prompt")
    written = [json.loads(line) for line in (run_dir / "round-002" / "pairs.jsonl").open()]
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in written] == \
        [(p.prompt, p.chosen, p.rejected) for p in again.pairs] and written
    assert summary["rounds"][2]["pairs"] == len(written)
    # the policy moved: round 2's model differs from round 1's
    assert any(not torch.equal(a, weights(run_dir, 2)[k]) for k, a in weights(run_dir, 1).items())
    for name in ("summary.json", "judge_scores.png", "round-000/metrics.json", "round-002/eval_samples.jsonl",
                 f"round-002/{MARKER}"):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "summary.json").read_text())["rounds"] == summary["rounds"]


@pytest.mark.slow
def test_the_reference_option_is_honoured(runs, tiny_model_dir):
    previous, fixed = runs["previous"][0], runs["fixed"][0]
    assert runs["previous"][1]["rounds"][1]["reference"] == tiny_model_dir  # round 1: the start, either way
    # round 2, first step (before any update): the implicit rewards β·log π/π_ref are 0 against the round's own
    # starting policy, and not against the starting model, which round 1 moved away from
    for key in ("rewards/chosen", "rewards/rejected"):
        assert abs(first_step(previous, 2)[key]) < 1e-5 and abs(first_step(fixed, 2)[key]) > 1e-3, key
    assert runs["fixed"][1]["rounds"][2]["reference"] == tiny_model_dir
    assert runs["previous"][1]["rounds"][2]["reference"] == str(previous / "round-001" / "model" / "final")


@pytest.mark.slow
def test_resume_recomputes_only_the_missing_round(runs, tiny_model_dir, prompt_files, tmp_path):
    original = runs["previous"][0]
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    (copy / "round-002" / MARKER).unlink()  # round 2 interrupted: everything but its marker written
    kept = (copy / "round-001" / "model" / "final" / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(ConfigError, match="already holds a run"):
        run_iterate(config(tiny_model_dir, prompt_files, copy, reference="previous"), log=lambda *_: None)
    with pytest.raises(ConfigError, match="other settings.*--beta 0.1"):
        run_iterate(config(tiny_model_dir, prompt_files, copy, reference="previous", beta=0.2, resume=True))
    lines = []
    summary = run_iterate(config(tiny_model_dir, prompt_files, copy, reference="previous", resume=True),
                          log=lines.append)
    assert "round 1: complete, kept" in " ".join(lines) and not any(line.startswith("round 1 [") for line in lines)
    assert (copy / "round-001" / "model" / "final" / "model.safetensors").stat().st_mtime_ns == kept
    assert (copy / "round-002" / "pairs.jsonl").read_bytes() == (original / "round-002" / "pairs.jsonl").read_bytes()
    assert all(torch.equal(a, weights(original, 2)[k]) for k, a in weights(copy, 2).items())
    redone, before = summary["rounds"][2], runs["previous"][1]["rounds"][2]
    for key in ("judge", "kl_vs_start", "pairs", "ties", "held_out_reward_accuracy", "held_out_metrics"):
        assert redone[key] == before[key], key


def test_judge_errors_name_the_judge_and_the_text():
    def bad(texts):
        return [1.0, "high", 0.5]

    bad.__name__ = "bad"
    with pytest.raises(DpokitError, match=r"judge 'bad' returned 'high' for text 1 \('p b'\)"):
        judge_scores(bad, ["p "] * 3, ["a", "b", "c"])
    with pytest.raises(DpokitError, match=r"judge 'nan_judge' returned nan for text 2 \('the end'\)"):
        judge_scores(_named(lambda ts: [nan_judge(t) for t in ts], "nan_judge"), ["", "", "the "], ["a", "b", "end"])
    with pytest.raises(DpokitError, match="judge 'two' returned 2 scores for 3 texts"):
        judge_scores(_named(lambda ts: [0.0, 1.0], "two"), [""] * 3, ["a", "b", "c"])
    from dpokit.judges.pointwise import function_judge

    with pytest.raises(DpokitError, match=r"judge 'f' failed on text 1 \('x'\): could not convert"):
        judge_scores(function_judge(_named(lambda t: "abc" if t == "x" else 1, "f")), ["", ""], ["a", "x"])


def test_what_the_judge_is_given():
    seen = []
    whole = _named(lambda ts: seen.append(ts) or [1, 2.5], "whole")
    chat = [{"role": "user", "content": "hi"}]
    # plain-text prompts are judged with their continuation, chat prompts by the reply alone
    assert judge_scores(whole, ["The film", chat], [" was good", "hello"]) == [1.0, 2.5]
    assert seen == [["The film was good", "hello"]]

    class Apart:  # a judge that scores a continuation given its prompt (as the implicit reward does)
        __name__ = "apart"

        def __call__(self, texts):
            raise AssertionError("called with whole texts")

        def continuations(self, prompts, continuations):
            return [len(p) + 10 * len(c) for p, c in zip(prompts, continuations)]

    assert judge_scores(Apart(), ["ab", "c"], ["x", "yz"]) == [12.0, 21.0]


def _named(fn, name):
    fn.__name__ = name
    return fn


@pytest.mark.slow
def test_a_nan_judge_is_a_one_line_cli_error(tiny_model_dir, prompt_files, tmp_path, capsys):
    code = main(["iterate", "--model", tiny_model_dir, "--prompts", prompt_files["train"], "--eval-prompts",
                 prompt_files["eval"], "--judge", "test_iterate:nan_judge", "--output", str(tmp_path / "out"),
                 "--max-new-tokens", "4", "--threads", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err, err
    err = err.splitlines()[-1]  # after the sampling progress bar
    assert err.startswith("dpokit iterate: error: judge 'nan_judge' returned nan for text ") and "held-out prompt" in err


def eval_rows(run_dir, number):
    rows = [json.loads(line) for line in (run_dir / f"round-{number:03d}" / "model" / "metrics.jsonl").open()]
    return [r for r in rows if r.get("split") == "eval"]


@pytest.mark.slow
def test_the_held_out_pairs_are_evaluated_along_each_rounds_training(runs):
    from dpokit.api import EvalConfig, evaluate

    run_dir, summary = runs["previous"]
    for number in (1, 2):
        reported = summary["rounds"][number]
        held_out = run_dir / f"round-{number:03d}" / "held_out_pairs.jsonl"
        rows = eval_rows(run_dir, number)
        assert held_out.read_text() and [r["step"] for r in rows] == [1, 2]  # 2 steps: every step (<= HELD_OUT_EVALS)
        assert reported["held_out_pairs"] == len(held_out.read_text().splitlines())
        # the round reports its training run's last evaluation; a standalone evaluation of the trained model
        # against the round's reference on the same pairs gives the same figures
        assert reported["held_out_reward_accuracy"] == rows[-1]["rewards/accuracies"]
        again = evaluate(EvalConfig(model=str(run_dir / f"round-{number:03d}" / "model" / "final"),
                                    data=str(held_out), ref_model=reported["reference"], beta=0.1, max_length=64, max_prompt_length=32), log=lambda *_: None)
        assert again["rewards/accuracies"] == pytest.approx(reported["held_out_reward_accuracy"], abs=1e-6)
        assert again["loss"] == pytest.approx(reported["held_out_metrics"]["loss"], abs=1e-5)


@pytest.mark.slow
def test_evaluating_along_the_way_leaves_the_training_unchanged(runs, tiny_model_dir, prompt_files, tmp_path):
    from dpokit.experiments.iterate import train_round

    run_dir = runs["previous"][0]
    settings = config(tiny_model_dir, prompt_files, run_dir).round_settings()
    pairs, held_out = run_dir / "round-001" / "pairs.jsonl", run_dir / "round-001" / "held_out_pairs.jsonl"
    plain, no_eval = train_round(tiny_model_dir, None, pairs, tmp_path / "plain", settings, 0, chat=False)
    assert no_eval == {}
    assert not [line for line in (tmp_path / "plain" / "metrics.jsonl").open() if '"eval"' in line]
    evaluated, _ = train_round(tiny_model_dir, None, pairs, tmp_path / "evaluated", settings, 0, chat=False,
                               eval_pairs_path=held_out)
    a, b = (load_file(f"{d}/model.safetensors") for d in (plain, evaluated))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_every_iterate_setting_is_a_flag_and_the_round_settings_are_shared(capsys):
    import dataclasses

    from dpokit.cli.main import build_parser
    from dpokit.config.experiments import DemoConfig, RoundOptions, RoundSettings
    from dpokit.config.options import flag, options_of

    names = {field.name for field in dataclasses.fields(IterateConfig)}
    assert {f.name for f in options_of(IterateConfig)} == names  # a field without help would be left out
    with pytest.raises(SystemExit):
        build_parser().parse_args(["iterate", "--help"])
    text = capsys.readouterr().out
    assert all(flag(name) in text for name in names) and text.count("(default: 0.1)") == 3  # gap, β, fraction
    settings = IterateConfig(prompts="p.txt", steps=7, labeling="bradley-terry").round_settings()
    assert type(settings) is RoundSettings and settings.steps == 7 and settings.labeling == "bradley-terry"
    assert settings == RoundSettings(steps=7, labeling="bradley-terry")  # the same defaults
    shared = {f.name for f in dataclasses.fields(RoundOptions)}  # declared once, for the demo and iterate
    assert shared <= {f.name for f in dataclasses.fields(DemoConfig)} and shared <= names
    demo = DemoConfig(beta=0.3).round_settings()
    assert (demo.beta, demo.samples_per_prompt, demo.steps) == (0.3, DemoConfig.completions, DemoConfig.dpo_steps)


@pytest.mark.parametrize("flags, message", [
    ([], "the following arguments are required: --prompts"),
    (["--prompts", "p.txt", "--temperature", "0"], "--temperature must be positive (pairs need samples"),
    (["--prompts", "p.txt", "--beta", "nan"], "--beta must be positive; got nan"),
    (["--prompts", "p.txt", "--lr", "inf"], "--lr must be positive; got inf"),
    (["--prompts", "p.txt", "--rounds", "0"], "--rounds must be at least 1; got 0"),
    (["--prompts", "p.txt", "--samples-per-prompt", "1"], "--samples-per-prompt must be at least 2 to form pairs"),
    (["--prompts", "p.txt", "--eval-fraction", "1"], "--eval-fraction must be in (0, 1); got 1.0"),
    (["--prompts", "p.txt", "--threads", "-1"], "--threads must be at least 1 (0: automatic); got -1"),
    (["--prompts", "p.txt", "--min-score-gap", "-0.5"], "--min-score-gap must not be negative"),
    (["--prompts", "p.txt", "--resume", "--overwrite"], "--resume continues the run in --output and --overwrite"),
    (["--prompts", "p.txt", "--reference", "last"], "argument --reference: invalid choice: 'last'"),
])
def test_iterate_options_are_checked_before_anything_runs(flags, message, tmp_path, capsys):
    try:
        code = main(["iterate", "--output", str(tmp_path / "out"), *flags])
    except SystemExit as exit_info:
        code = exit_info.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("dpokit iterate: error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_iterate_reads_its_options_from_yaml(tmp_path):
    from dpokit.cli.main import build_parser
    from dpokit.cli.options import config_from_args

    run = tmp_path / "run.yaml"
    run.write_text("prompts: p.txt\nrounds: 2\nreference: previous\nbt-scale: 3\noverwrite: true\n")
    config = config_from_args(build_parser().parse_args(["iterate", "--config", str(run), "--rounds", "5"]))
    assert (config.prompts, config.rounds, config.reference, config.bt_scale, config.overwrite) == \
        ("p.txt", 5, "previous", 3, True)


def test_kl_per_sequence_respects_a_sliding_window():
    from dpokit.data.batching import collate
    from dpokit.eval.generation import Sample
    from dpokit.experiments.iterate import kl_per_sequence
    from dpokit.models.logprobs import sequence_logprobs
    from dpokit.data.tokenize import TokenizedExample

    policy, reference = make_mistral(8, vocab_size=50, seed=0), make_mistral(8, vocab_size=50, seed=1)
    samples = [Sample(list(range(1, 7)), list(range(10, 10 + n)), "") for n in (12, 5)]  # the first outruns 8
    examples = [TokenizedExample(tuple(s.prompt_ids), (tuple(s.ids),)) for s in samples]
    with torch.no_grad():
        plain = collate(examples, range(2), layout="plain")
        expected = (sequence_logprobs(policy, plain) - sequence_logprobs(reference, plain)).tolist()
    assert kl_per_sequence(policy, reference, samples) == pytest.approx(expected, abs=1e-5)
