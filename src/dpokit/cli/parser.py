"""The command line's argument parser: argparse with one-line errors, no abbreviated flags, the closest known flag
for a mistyped one, and a command's ``--config FILE.yaml`` read as that command's defaults (type-checked).

Standard library and PyYAML only: parsing must not import torch or transformers (see dpokit.cli.main).
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from typing import Any

from dpokit.errors import DpokitError


class Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line (no usage dump) like every other dpokit error; exit code 2.

    No abbreviated flags (``--be`` is not ``--beta``); an unknown flag is answered with the closest known one.
    A command's ``--config FILE.yaml`` is read before its flags: its values become the command's defaults (so
    flags override them, and an option the YAML gives is no longer missing), checked against the command's
    options by `read_config`.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.read_config = None  # a command's YAML reader: path -> {dest: value}

    def error(self, message: str):
        """Print `message` on one line (with the closest choice to an invalid one) and exit with code 2."""
        invalid = re.search(r"invalid choice: '(.*?)' \(choose from (.*)\)$", message)
        if invalid:
            choices = re.findall(r"'(.*?)'", invalid.group(2))
            close = difflib.get_close_matches(invalid.group(1), choices, n=1, cutoff=0.6)
            message += f"; did you mean {close[0]!r}?" if close else ""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        """As argparse's, with the YAML of ``--config`` as defaults and unknown flags an error with a hint."""
        if self.read_config is None:
            return super().parse_known_args(args, namespace)
        args = list(sys.argv[1:] if args is None else args)
        path = _config_path(args)
        if path is not None:
            try:
                values = self.read_config(path)
            except DpokitError as error:
                self.error(str(error))
            _yaml_defaults(self, values)
        unknown = _unknown_flags(self, args)
        if unknown:  # before argparse's own checks: a mistyped flag often is the "missing" required one
            self.error(_unrecognized(self, unknown, "unknown option" + "s" * (len(unknown) > 1)))
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(_unrecognized(self, extras))
        return namespace, extras


def _config_path(args: list[str]) -> str | None:
    """The value of ``--config`` in a command's arguments (the last one given), or None."""
    path = None
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if arg == "--config" and i + 1 < len(args):
            path = args[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
    return path


def _yaml_defaults(parser: argparse.ArgumentParser, values: dict[str, Any]) -> None:
    """Make YAML values the parser's defaults; an option (or exclusive group) the YAML gives is not required."""
    parser.set_defaults(**values)
    for action in parser._actions:
        if action.dest in values:
            action.required = False
    for group in parser._mutually_exclusive_groups:
        if any(action.dest in values for action in group._group_actions):
            group.required = False


def _flags(parser: argparse.ArgumentParser) -> list[str]:
    return [s for action in parser._actions for s in action.option_strings if s.startswith("--")]


def _unknown_flags(parser: argparse.ArgumentParser, args: list[str]) -> list[str]:
    """The ``--flags`` in `args` that `parser` does not know (exact names only: no abbreviations)."""
    known = set(_flags(parser))
    unknown = []
    for arg in args:
        if arg == "--":
            break
        flag = arg.split("=", 1)[0]
        if flag.startswith("--") and flag not in known:
            unknown.append(flag)
    return unknown


# TRL's flags that have no one-to-one dpokit flag (those that do are aliases of it: --learning-rate is --lr) and
# what to write instead; shown when one is typed out of habit.
TRL_FLAGS = {
    "--bf16": "--dtype bfloat16",
    "--fp16": "--dtype bfloat16 (dpokit trains in float32 or bfloat16)",
    "--use-peft": "--lora-r 16 (a LoRA rank turns LoRA on)",
    "--model-name-or-path": "--model",
    "--dataset-name": "--data",
    "--lora-target-modules-all": "--lora-target-modules (default: every linear layer)",
    "--per-device-batch-size": "--batch-size",
    "--num-epochs": "--epochs",
    "--max-completion-length": "--max-length (prompt + response) with --max-prompt-length",
    "--rpo-alpha": "--sft-weight",
}


def _unrecognized(parser: argparse.ArgumentParser, extras: list[str], what: str = "unrecognized arguments") -> str:
    """argparse's message for unknown arguments, with the dpokit flag for a TRL one, or else the closest known
    flag, for each mistyped one."""
    flags = _flags(parser)
    hints = []
    for word in extras:
        flag = word.split("=", 1)[0]
        if flag in TRL_FLAGS and TRL_FLAGS[flag].split()[0] in flags:
            hints.append((flag, TRL_FLAGS[flag]))
        elif flag.startswith("--") and flag not in flags:
            close = difflib.get_close_matches(flag, flags, n=1, cutoff=0.6)
            hints += [(flag, close[0])] if close else []
    message = f"{what}: {' '.join(extras)}"
    if len(hints) == 1:
        return f"{message} (did you mean {hints[0][1]}?)"
    return message + (" (did you mean " + ", ".join(f"{good} for {bad}" for bad, good in hints) + "?)" if hints else "")
