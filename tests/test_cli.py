"""The command line: every option of the issue in --help, YAML + flag precedence, one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dpokit.cli import _train_config, build_parser, main

pytestmark = pytest.mark.usefixtures("single_thread")

TRAIN_OPTIONS = ("--model --data --eval-data --output --batch-size --grad-accum --lr --optimizer --warmup-steps "
                 "--max-steps --epochs --max-length --max-prompt-length --truncation --dtype --seed --eval-every "
                 "--save-every --resume --config").split()
DPO_ONLY = "--ref-model --loss --beta --label-smoothing --sft-weight".split()
EVAL_OPTIONS = ("--model --ref-model --data --loss --beta --label-smoothing --batch-size --max-length "
                "--max-prompt-length --truncation --dtype --json").split()
GENERATE_OPTIONS = "--model --prompt --prompts --max-new-tokens --temperature --top-p --num-samples --seed".split()


def help_text(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def options_in(text: str) -> set[str]:
    return {word.rstrip(",=]") for word in text.replace("[", " ").split() if word.startswith("--")}


@pytest.mark.parametrize("command,expected,absent", [
    ("dpo", TRAIN_OPTIONS + DPO_ONLY, []),
    ("sft", TRAIN_OPTIONS, DPO_ONLY),
    ("eval", EVAL_OPTIONS, []),
    ("generate", GENERATE_OPTIONS, []),
])
def test_help_lists_every_option(command, expected, absent, capsys):
    listed = options_in(help_text(command, capsys))
    assert set(expected) <= listed, sorted(set(expected) - listed)
    assert not set(absent) & listed


def test_yaml_gives_options_and_flags_override_them(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model: from-yaml\ndata: data.jsonl\noutput: out\nbeta: 0.3\nlr: 2.0e-4\nloss: ipo\n"
                      "max-length: 128\nbatch_size: 3\nresume: true\nschedule: cosine\n")
    args = build_parser().parse_args(["dpo", "--config", str(config), "--beta", "0.5", "--model", "from-flag",
                                      "--no-resume", "--grad-accum", "2"])
    cfg = _train_config("dpo", args)
    assert (cfg.model, cfg.data, cfg.output) == ("from-flag", "data.jsonl", "out")
    assert cfg.beta == 0.5 and cfg.lr == 2e-4 and cfg.loss == "ipo" and cfg.max_length == 128
    assert cfg.batch_size == 3 and cfg.grad_accum == 2 and cfg.schedule == "cosine" and cfg.resume is False
    assert cfg.optimizer == "rmsprop" and cfg.warmup_steps == 150  # untouched defaults
    # without a flag, the YAML value stands
    cfg = _train_config("dpo", build_parser().parse_args(["dpo", "--config", str(config)]))
    assert cfg.beta == 0.3 and cfg.resume is True and cfg.model == "from-yaml"


def test_a_run_stores_the_merged_config(tiny_model_dir, sentiment_data, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_model_dir}\ndata: {sentiment_data['train']}\nbeta: 0.25\nlr: 5.0e-4\n"
                      "max_steps: 1\nbatch_size: 4\nwarmup_steps: 0\nsft_weight: 0.1\n")
    out = tmp_path / "out"
    assert main(["dpo", "--config", str(config), "--output", str(out), "--lr", "3e-4", "--seed", "7"]) == 0
    stored = json.loads((out / "checkpoint-000001" / "trainer_state.json").read_text())["config"]
    assert stored["beta"] == 0.25 and stored["lr"] == 3e-4 and stored["seed"] == 7 and stored["sft_weight"] == 0.1
    assert stored["model"] == tiny_model_dir and stored["max_steps"] == 1


def test_sft_rejects_dpo_only_yaml_keys(tmp_path):
    config = tmp_path / "sft.yaml"
    config.write_text("beta: 0.1\n")
    args = build_parser().parse_args(["sft", "--config", str(config), "--model", "m", "--data", "d", "--output", "o"])
    with pytest.raises(Exception, match="unknown option.*beta"):
        _train_config("sft", args)


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dpokit.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def assert_one_line_error(result: subprocess.CompletedProcess, command: str, *words: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"dpokit {command}: error: "), lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert result.stdout == ""


def _in_process(args, capsys) -> subprocess.CompletedProcess:
    """main() as `python -m dpokit.cli` runs it (sys.exit(main())), with its exit code and output."""
    try:
        code = main(args)
    except SystemExit as exit_info:  # argparse errors
        code = exit_info.code
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def test_errors_are_one_line_with_exit_code_2(tiny_model_dir, tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "the film", "chosen": " great", "rejected": " awful"}\n' * 4)
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text('{"prompt": "the film", "chosen": " great", "rejected": " awful"}\n'
                        '{"prompt": "the film", "chosen": \n')
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("betta: 0.2\n")
    base = ["--data", str(good), "--output", str(tmp_path / "out")]
    cases = [
        (["dpo", "--config", str(unknown), "--model", tiny_model_dir, *base], "dpo", ("betta",)),
        (["dpo", "--loss", "nope", "--model", tiny_model_dir, *base], "dpo", ("--loss", "nope")),
        (["sft", "--optimizer", "sgd", "--model", tiny_model_dir, *base], "sft", ("--optimizer",)),
        (["dpo", "--batch-size", "two", "--model", tiny_model_dir, *base], "dpo", ("--batch-size",)),
        (["dpo", *base], "dpo", ("--model",)),
        (["dpo", "--model", tiny_model_dir, "--data", str(bad_line), "--output", str(tmp_path / "o2")], "dpo",
         ("bad.jsonl:2",)),
        (["eval", "--model", tiny_model_dir, "--data", str(good)], "eval", ("--ref-model",)),
    ]
    for args, command, words in cases:
        assert_one_line_error(_in_process(args, capsys), command, *words)
    assert not (tmp_path / "out").exists() and not (tmp_path / "o2").exists()
    # and as a real process: exit status 2, one line, no traceback (argparse and a data error)
    assert_one_line_error(run_cli(*cases[1][0]), "dpo", "--loss")
    assert_one_line_error(run_cli(*cases[5][0]), "dpo", "bad.jsonl:2")


def test_a_yaml_value_outside_its_choices_is_a_one_line_error(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("loss: nope\n")
    assert main(["dpo", "--config", str(config), "--model", "m", "--data", "d", "--output", "o"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dpokit dpo: error: --loss must be one of")


@pytest.mark.parametrize("flags, words", [
    (["--loss", "apo_zero", "--label-smoothing", "0.1"], ("--label-smoothing", "apo_zero")),
    (["--loss", "exo_pair"], ("--label-smoothing", "exo_pair")),
    (["--loss", "orpo", "--sft-weight", "0.5"], ("--sft-weight", "orpo")),
    (["--loss", "sigmoid", "--simpo-gamma", "0.5"], ("--simpo-gamma", "sigmoid")),
    (["--loss", "simpo", "--ref-model", "some/model"], ("--ref-model", "simpo", "reference-free")),
    (["--loss", "orpo", "--precompute-ref"], ("--precompute-ref", "orpo")),
    (["--loss", "sigmoid,bco_pair", "--loss-weights", "0.8"], ("--loss-weights", "1 weight(s) for 2")),
    (["--loss", "sigmoid,bco_pair", "--loss-weights", "0.8,x"], ("--loss-weights", "numbers")),
    (["--loss", "sigmoid,simpo"], ("--loss", "cannot be mixed")),
    (["--loss", "sigmoid,nope"], ("--loss", "'nope'")),
    (["--loss", "sigmoid", "--dpop-lambda", "5"], ("--dpop-lambda", "sigmoid")),
])
def test_an_option_the_loss_does_not_take_is_a_one_line_error(flags, words, tmp_path, capsys):
    args = ["dpo", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "d.jsonl"), "--output",
            str(tmp_path / "out"), *flags]
    assert_one_line_error(_in_process(args, capsys), "dpo", *words)
    assert not (tmp_path / "out").exists()
