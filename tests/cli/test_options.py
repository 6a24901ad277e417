"""Every option declared once: for every command, each flag is a field of its config and each field a flag (or
its positional argument), the YAML keys of --config are the same names, and every numeric option refuses
nan, infinities and values outside its declared range with a one-line error."""

from __future__ import annotations

import argparse
import math

import pytest
import yaml

from dpokit.cli.main import build_parser, main
from dpokit.config.options import flag, make, options_of, value_kind
from dpokit.errors import ConfigError

PARSER = build_parser()
COMMANDS = {name: sub for action in PARSER._actions if isinstance(action, argparse._SubParsersAction)
            for name, sub in action.choices.items()}
# The options besides the required ones that a valid config of the command needs.
EXTRA = {"eval": {"ref_model": "ref"}, "score": {"ref_model": "ref"}, "rank": {"ref_model": "ref"}}


def _config_of(command: str) -> tuple[type, str | None]:
    sub = COMMANDS[command]
    return sub.get_default("config_class"), sub.get_default("stage")


def _base(command: str) -> dict:
    """A valid set of options for `command`: its required ones given (one of each exclusive group)."""
    cls, stage = _config_of(command)
    values, groups = {}, set()
    for f in options_of(cls, stage):
        group = f.metadata.get("exclusive")
        if f.metadata["required"] and not (group and group in groups):
            values[f.name] = f.metadata["choices"][0] if f.metadata["choices"] else "x.jsonl"
            groups.add(group)
    return values | EXTRA.get(command, {})


def test_every_command_declares_its_options_in_a_config():
    assert sorted(COMMANDS) == sorted(["dpo", "sft", "eval", "demo", "generate", "merge", "score", "rank", "winrate",
                                       "iterate", "reproduce", "push", "reward"])
    for command in COMMANDS:
        cls, _ = _config_of(command)
        assert cls is not None, f"dpokit {command} has no config class"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_flag_is_a_field_and_each_field_a_flag(command):
    cls, stage = _config_of(command)
    fields = {f.name for f in options_of(cls, stage)}
    dests = {action.dest for action in COMMANDS[command]._actions if action.dest not in ("help", "config")}
    assert dests == fields
    for action in COMMANDS[command]._actions:  # the flag is the field's name (aliases besides it)
        if action.option_strings and action.dest not in ("help", "config"):
            assert flag(action.dest) in action.option_strings


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_the_yaml_keys_are_the_fields(command, tmp_path):
    cls, stage = _config_of(command)
    path = tmp_path / "all.yaml"
    values = {f.name: int(f.default) if type(f.default).__name__ == "Default" else f.default  # a plain int
              for f in options_of(cls, stage)} | _base(command)
    path.write_text(yaml.safe_dump(values))
    assert set(COMMANDS[command].read_config(path)) == set(values)
    path.write_text("not_an_option: 1\n")
    with pytest.raises(ConfigError, match="unknown option"):
        COMMANDS[command].read_config(path)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_the_required_options_make_a_valid_config(command):
    cls, stage = _config_of(command)
    make(cls, _base(command), command, stage)


def _numeric(command):
    cls, stage = _config_of(command)
    return [f for f in options_of(cls, stage) if value_kind(f) in (int, float)]


CASES = [(command, f.name) for command in sorted(COMMANDS) for f in _numeric(command)]


@pytest.mark.parametrize("command, name", CASES, ids=[f"{c}-{n}" for c, n in CASES])
def test_numeric_options_refuse_nan_infinities_and_values_out_of_range(command, name):
    cls, stage = _config_of(command)
    field = {f.name: f for f in options_of(cls, stage)}[name]
    rule = field.metadata["range"]
    bad = [math.nan, math.inf, -math.inf] + [v for v in (-1, 0) if rule is not None and not rule.holds(v)]
    for value in bad:
        with pytest.raises(ConfigError) as caught:
            make(cls, _base(command) | {name: value}, command, stage)
        message = str(caught.value)
        assert "\n" not in message and (name in message or flag(name) in message), (value, message)


def test_the_command_line_says_it_in_one_line_with_exit_code_2(capsys):
    for argv in (["dpo", "--model", "m", "--data", "d.jsonl", "--output", "o", "--lr", "nan"],
                 ["dpo", "--model", "m", "--data", "d.jsonl", "--output", "o", "--warmup-ratio", "inf"],
                 ["eval", "--model", "m", "--data", "d.jsonl", "--reference-free", "--batch-size", "0"],
                 ["generate", "--model", "m", "--prompt", "hi", "--top-p", "-0.5"],
                 ["demo", "--dpo-steps", "-3"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"dpokit {argv[0]}: error: "), err
