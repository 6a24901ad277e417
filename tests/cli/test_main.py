"""The command line: every option of the issue in --help, YAML + flag precedence, one-line errors with exit code 2."""

from __future__ import annotations

import argparse

import json
import subprocess
import sys

import pytest

from dpokit.cli.main import build_parser, main
from dpokit.cli.options import config_from_args

pytestmark = pytest.mark.usefixtures("single_thread")

TRAIN_OPTIONS = ("--model --data --eval-data --output --batch-size --grad-accum --lr --optimizer --warmup-steps "
                 "--max-steps --epochs --max-length --max-prompt-length --truncation --dtype --seed --eval-every "
                 "--save-every --resume --config --apply-chat-template --no-apply-chat-template").split()
DPO_ONLY = "--ref-model --loss --beta --label-smoothing --sft-weight".split()
EVAL_OPTIONS = ("--model --ref-model --data --loss --beta --label-smoothing --batch-size --max-length "
                "--max-prompt-length --truncation --dtype --json --apply-chat-template").split()
GENERATE_OPTIONS = ("--model --prompt --prompts --max-new-tokens --temperature --top-p --num-samples --seed "
                    "--system --chat-template --no-chat-template --batch-size --jsonl").split()


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


def test_apply_chat_template_reaches_the_config_from_a_flag_or_yaml(tmp_path):
    base = ["dpo", "--model", "m", "--data", "d.jsonl", "--output", "o"]
    assert config_from_args(build_parser().parse_args(base)).apply_chat_template is False
    assert config_from_args(build_parser().parse_args(base + ["--apply-chat-template"])).apply_chat_template
    config = tmp_path / "run.yaml"
    config.write_text("apply_chat_template: true\n")
    assert config_from_args(build_parser().parse_args(["sft", *base[1:], "--config", str(config)])) \
        .apply_chat_template


def test_yaml_gives_options_and_flags_override_them(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model: from-yaml\ndata: data.jsonl\noutput: out\nbeta: 0.3\nlr: 2.0e-4\nloss: ipo\n"
                      "max-length: 128\nbatch_size: 3\nresume: true\nschedule: cosine\n")
    args = build_parser().parse_args(["dpo", "--config", str(config), "--beta", "0.5", "--model", "from-flag",
                                      "--no-resume", "--grad-accum", "2"])
    cfg = config_from_args(args)
    assert (cfg.model, cfg.data, cfg.output) == ("from-flag", "data.jsonl", "out")
    assert cfg.beta == 0.5 and cfg.lr == 2e-4 and cfg.loss == "ipo" and cfg.max_length == 128
    assert cfg.batch_size == 3 and cfg.grad_accum == 2 and cfg.schedule == "cosine" and cfg.resume is False
    assert cfg.optimizer == "rmsprop" and cfg.warmup_steps == 150  # untouched defaults
    # without a flag, the YAML value stands
    cfg = config_from_args(build_parser().parse_args(["dpo", "--config", str(config)]))
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


def test_sft_rejects_dpo_only_yaml_keys(tmp_path, capsys):
    config = tmp_path / "sft.yaml"
    config.write_text("beta: 0.1\n")
    with pytest.raises(SystemExit) as exit_info:  # while parsing: before any flag is even looked at
        build_parser().parse_args(["sft", "--config", str(config), "--model", "m", "--data", "d", "--output", "o"])
    assert exit_info.value.code == 2
    assert "unknown option(s) for `dpokit sft`: beta (see dpokit sft --help)" in capsys.readouterr().err


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dpokit.cli.main", *args], capture_output=True, text=True, cwd=cwd,
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
    """main() as `python -m dpokit.cli.main` runs it (sys.exit(main())), with its exit code and output."""
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
    (["--ld-alpha", "0.5", "--precompute-ref"], ("--ld-alpha", "--precompute-ref")),
    (["--ld-alpha", "2"], ("ld_alpha", "[0, 1]")),
])
def test_an_option_the_loss_does_not_take_is_a_one_line_error(flags, words, tmp_path, capsys):
    args = ["dpo", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "d.jsonl"), "--output",
            str(tmp_path / "out"), *flags]
    assert_one_line_error(_in_process(args, capsys), "dpo", *words)
    assert not (tmp_path / "out").exists()


# --- a fast, precise command line (issue 9 item 6) ---

def _imported_modules(*args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run `python -X importtime -m dpokit.cli.main ARGS`: its result and the top-level packages it imported."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "dpokit.cli.main", *args], capture_output=True,
                            text=True, timeout=120)
    names = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in result.stderr.splitlines()
             if line.startswith("import time:") and "|" in line}
    return result, names


@pytest.mark.parametrize("args,code", [
    (["--version"], 0),
    (["--help"], 0),
    (["dpo", "--help"], 0),
    (["eval", "--help"], 0),
    (["demo", "--help"], 0),
    (["dpo", "--bta", "0.2"], 2),
    (["dpo", "--model", "runs/sft/fnal", "--data", "pairs.jsonl", "--output", "out"], 2),
    (["dpo", "--model", "m", "--data", "d", "--output", "o", "--beta", "-1"], 2),
    (["eval", "--model", "runs/sft/fnal", "--data", "pairs", "--reference-free"], 2),
])
def test_help_version_and_option_errors_import_neither_torch_nor_transformers(args, code, tmp_path):
    result, modules = _imported_modules(*args)
    assert result.returncode == code, result.stderr[-2000:]
    assert "dpokit" in modules and "yaml" in modules  # the import log is read correctly
    assert not {"torch", "transformers", "accelerate", "datasets", "peft"} & modules
    assert not (tmp_path / "out").exists()


def test_no_abbreviated_flags_and_a_hint_for_a_mistyped_one(capsys):
    for wrong, right in (("--be", "--beta"), ("--bta", "--beta"), ("--max-lenght", "--max-length")):
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args(["dpo", wrong, "0.5", "--model", "m", "--data", "d", "--output", "o"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err == f"dpokit dpo: error: unknown option: {wrong} (did you mean {right}?) (see dpokit dpo --help)"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--mod", "m", "--data", "d"])
    assert "unknown option: --mod (did you mean --model?)" in capsys.readouterr().err  # not "--model is required"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["dpo", "--lrr", "1", "--bta=2", "--model", "m", "--data", "d", "--output", "o"])
    assert "unknown options: --lrr --bta (did you mean --lr for --lrr, --beta for --bta?)" in capsys.readouterr().err


def test_required_options_are_required_in_the_usage_lines(capsys):
    for command, required in (("dpo", "--model MODEL --data DATA --output OUTPUT"),
                              ("sft", "--model MODEL --data DATA --output OUTPUT"),
                              ("eval", "--model MODEL"), ("merge", "--adapter ADAPTER --output OUTPUT")):
        usage = " ".join(help_text(command, capsys).split("\n\n")[0].split())
        assert required in usage, usage
        assert "[--model" not in usage and "[--beta" in usage or command != "dpo"


def test_every_command_takes_a_config_file(tmp_path, capsys):
    run = tmp_path / "run.yaml"
    run.write_text("model: runs/a\nref-model: runs/b\ndata: pairs.jsonl\nbeta: 0.3\njson: true\nmax_length: 64\n")
    args = build_parser().parse_args(["eval", "--config", str(run), "--beta", "0.5"])
    assert (args.model, args.ref_model, args.data, args.beta, args.json, args.max_length) == \
        ("runs/a", "runs/b", "pairs.jsonl", 0.5, True, 64)
    merge = tmp_path / "merge.yaml"
    merge.write_text("adapter: runs/lora/final\noutput: runs/merged\ndtype: bfloat16\n")
    args = build_parser().parse_args(["merge", "--config", str(merge)])
    assert (args.adapter, args.output, args.dtype) == ("runs/lora/final", "runs/merged", "bfloat16")
    demo = tmp_path / "demo.yaml"
    demo.write_text("dpo_steps: 3\nbeta: 0.2\nlabeling: bradley-terry\n")
    args = build_parser().parse_args(["demo", "--config", str(demo), "--seed", "4"])
    assert (args.dpo_steps, args.beta, args.labeling, args.seed) == (3, 0.2, "bradley-terry", 4)
    assert "--config" in options_in(help_text("generate", capsys))
    for text, words in (("betta: 0.2\n", "unknown option(s) for `dpokit eval`: betta (did you mean beta?)"),
                        ("beta: high\n", "option 'beta' must be a number, got 'high'"),
                        ("batch_size: 2.5\n", "option 'batch_size' must be an integer"),
                        ("json: 1\n", "option 'json' must be true or false"),
                        ("dtype: float8\n", "option 'dtype' must be one of float32, bfloat16")):
        run.write_text(text)
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args(["eval", "--config", str(run), "--model", "m", "--data", "d"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"dpokit eval: error: {run}: ") and words in err and err.endswith("(see dpokit eval --help)")


def test_paths_that_do_not_exist_are_named_and_never_looked_up_on_the_hub(tmp_path, capsys, monkeypatch):
    import dpokit.data.sources as sources

    monkeypatch.setattr(sources, "_read_hub", lambda *a: pytest.fail("tried the Hub"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: no bare name is known
    (tmp_path / "runs").mkdir()
    (tmp_path / "pairs.txt").write_text("x")
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "a", "chosen": " b", "rejected": " c"}\n')
    cases = [
        (["--model", "runs/sft/fnal"], "--model runs/sft/fnal: no such directory"),
        (["--model", "runs/fnal"], "--model runs/fnal: no such directory"),  # runs/ exists: a path, not owner/name
        (["--model", "./fnal"], "--model ./fnal: no such directory"),
        (["--model", "gpt9"], "--model gpt9: no such directory, and not a Hub name of the form owner/name"),
        (["--data", "pairs"], "--data pairs: no such file or directory, and not a Hub data set"),
        (["--data", "pairs.jsonl"], "--data pairs.jsonl: no such file or directory"),
        (["--eval-data", "held/out.csv"], "--eval-data held/out.csv: no such file or directory"),
        (["--ref-model", "~/nowhere/model"], "--ref-model ~/nowhere/model: no such directory"),
    ]
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    for flags, message in cases:
        values = {"--model": str(model), "--data": str(good), "--output": "out"}
        values.update(dict(zip(flags[::2], flags[1::2])))
        line = _in_process(["dpo", *[x for kv in values.items() for x in kv]], capsys).stderr.strip()
        assert line == f"dpokit dpo: error: {message}" + line.split(message, 1)[1], (line, message)
        assert line.endswith("(see dpokit dpo --help)")
    assert "pairs.txt: unsupported file type" in _in_process(
        ["dpo", "--model", str(model), "--data", "pairs.txt", "--output", "out"], capsys).stderr
    assert not (tmp_path / "out").exists()
    # a bare name the local cache holds is a Hub name after all
    from dpokit.data.validation import check_data_spec, check_model_spec

    (tmp_path / "hf" / "hub" / "models--gpt9").mkdir(parents=True)
    (tmp_path / "hf" / "hub" / "datasets--pairs").mkdir(parents=True)
    check_model_spec("--model", "gpt9")
    check_data_spec("--data", "pairs")
    check_model_spec("--model", "owner/name")
    check_data_spec("--data", "owner/name:config")


def _stderr_error(result: subprocess.CompletedProcess, command: str, *words: str) -> None:
    """A one-line error, exit code 2; what the run logged on stdout before it (data counts) is allowed."""
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"dpokit {command}: error: "), lines
    assert all(word in lines[0] for word in words), (words, lines[0])


def test_checks_that_need_no_model_come_before_any_model_is_loaded(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import dpokit.train.run

    monkeypatch.setattr(dpokit.train.run, "load_policy", lambda *a, **k: pytest.fail("a model was loaded"))
    few = tmp_path / "few.jsonl"
    few.write_text('{"prompt": "the film", "chosen": " great", "rejected": " awful"}\n' * 3)
    result = _in_process(["dpo", "--model", tiny_model_dir, "--data", str(few), "--output", str(tmp_path / "o"),
                          "--batch-size", "2", "--grad-accum", "2"], capsys)
    _stderr_error(result, "dpo", "3 training examples are fewer than one global batch of 4")
    result = _in_process(["sft", "--model", tiny_model_dir, "--data", str(few), "--output", str(tmp_path / "o2"),
                          "--batch-size", "1", "--epochs", "0.2"], capsys)
    _stderr_error(result, "sft", "--epochs 0.2 of 3 steps per epoch", "less than one step")
    small = tmp_path / "small-model"
    from helpers import make_llama, make_tokenizer

    make_llama(vocab_size=len(make_tokenizer()), max_position_embeddings=64).save_pretrained(small)
    make_tokenizer().save_pretrained(small)
    result = _in_process(["dpo", "--model", str(small), "--data", str(few), "--output", str(tmp_path / "o3"),
                          "--max-length", "128"], capsys)
    _stderr_error(result, "dpo", "--max-length 128 is more than the 64 positions of")


def test_what_a_run_would_do_silently_is_said_before_it_starts(tmp_path, capsys):
    """The default --max-length lowered to a 64-position model, a warm-up longer than the run, an --eval-every
    without evaluation data, and prompts glued to their responses: each said once, before the first step."""
    from helpers import make_llama, make_tokenizer

    small = tmp_path / "small-model"
    make_llama(vocab_size=len(make_tokenizer()), max_position_embeddings=64).save_pretrained(small)
    make_tokenizer().save_pretrained(small)
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "The film", "chosen": "is a delight", "rejected": " is dull"}] * 3 + \
           [{"prompt": "The film", "chosen": " was good", "rejected": " was bad"}] * 5
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["dpo", "--model", str(small), "--data", str(data), "--output", str(tmp_path / "out"),
                 "--max-steps", "2", "--batch-size", "4", "--eval-every", "5", "--no-data-cache"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("training 2 steps"))
    expected = [
        "note: --max-length 64, not the default 512: " + str(small) + " has 64 positions; --max-prompt-length 32",
        "warning: 3 of 8 examples join prompt and response with no space between two words (e.g. 'The film' + "
        f"'is a delight' at {data}:1)",
        "warning: the warm-up (150 steps) is not shorter than the run (2 steps): the learning rate rises to only "
        "1.33% of --lr 1e-06 at the last step",
        "warning: --eval-every 5 but there is no evaluation data",
    ]
    for text in expected:
        where = [i for i, line in enumerate(lines) if line.startswith(text)]
        assert len(where) == 1 and where[0] < start, (text, out)
    stored = json.loads((tmp_path / "out" / "checkpoint-000002" / "trainer_state.json").read_text())["config"]
    assert stored["max_length"] == 64 and stored["max_prompt_length"] == 32


def test_an_invalid_choice_gets_the_closest_one(capsys):
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert list(commands)[:6] == ["dpo", "sft", "eval", "demo", "generate", "merge"]  # then dpokit/commands' others
    for args, prog, expected in (
            (["dpp"], "dpokit", f"invalid choice: 'dpp' (choose from {', '.join(map(repr, commands))}); "
                                "did you mean 'dpo'?"),
            (["dpo", "--truncation", "keep_ends"], "dpokit dpo", "invalid choice: 'keep_ends' (choose from "
                                                                "'keep_end', 'keep_start'); did you mean 'keep_end'?")):
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args(args)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"{prog}: error: ") and err.endswith(f"{expected} (see {prog} --help)"), err


@pytest.mark.parametrize("command, reexecs", [("dpo", True), ("eval", True), ("demo", False)])
def test_the_command_line_reexecutes_on_a_leaner_malloc_except_for_the_demo(command, reexecs, monkeypatch):
    """From the command line (argv None) the process re-executes on mimalloc/jemalloc (dpokit.runtime.memory), except
    for the demo's tiny model; a call from Python (argv given) never does."""
    import dpokit.cli.main as cli

    calls = []
    monkeypatch.setattr(cli, "reexec_with_malloc", lambda: calls.append("reexec"))
    import dpokit.cli.demo
    import dpokit.cli.eval
    import dpokit.cli.train

    for module in (dpokit.cli.train, dpokit.cli.eval, dpokit.cli.demo):
        monkeypatch.setattr(module, "_run", lambda args: calls.append("ran"))
    args = {"dpo": ["--model", "m", "--data", "d.jsonl", "--output", "out"],
            "eval": ["--model", "m", "--data", "d.jsonl", "--reference-free"], "demo": []}[command]
    monkeypatch.setattr(sys, "argv", ["dpokit", command, *args])
    assert cli.main() == 0
    assert calls == (["reexec", "ran"] if reexecs else ["ran"])
    calls.clear()
    assert cli.main([command, *args]) == 0
    assert calls == ["ran"]


def test_library_noise_no_dpokit_user_can_act_on_is_quieted_and_nothing_else(caplog):
    import logging
    import warnings

    from dpokit.cli.main import _quiet_library_noise

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _quiet_library_noise()
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("something else is deprecated", FutureWarning)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "untrusted")
        logger.warning("a real problem")
    assert [r.getMessage() for r in caplog.records] == ["a real problem"]


def test_dpokit_warnings_print_as_one_line(monkeypatch, capsys):
    import warnings

    from dpokit.cli.main import _warnings_as_lines
    from dpokit.errors import DpokitWarning

    shown = []
    monkeypatch.setattr(warnings, "showwarning", lambda *a, **k: shown.append(a[0]))
    _warnings_as_lines()
    _warnings_as_lines()  # a second call does not wrap it twice
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("using the plain layout", DpokitWarning)
        warnings.warn("a library's own warning", UserWarning)
    assert capsys.readouterr().err == "dpokit: warning: using the plain layout\n"
    assert [str(m) for m in shown] == ["a library's own warning"]
