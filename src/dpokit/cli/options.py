"""Flags from config fields: every command's options are the fields of its config dataclass (dpokit.config), so
a flag, its help and default, its YAML key and its Python keyword are one declaration.

Standard library only (and dpokit.config): building the parser must not import torch or transformers.
"""

from __future__ import annotations

import argparse
from typing import Any

from dpokit.config.options import flag, make, options_of, read_yaml, value_kind

CONFIG_HELP = ("read options from a YAML file (keys are the option names, with _ or -); flags given on the command "
               "line override it")


def _default_text(value: Any) -> str:
    return "" if value is None else f" (default: {value})"


def add_options(parser: argparse.ArgumentParser, cls: type, command: str, stage: str | None = None) -> None:
    """Add a flag for every option of config class `cls` that `stage` takes, and ``--config FILE.yaml``.

    Flags have no argparse default (an option not given stays out of the namespace), so the config's own
    defaults apply, including :class:`dpokit.config.options.Default` markers that tell a default from a value
    given. Booleans are ``--x``/``--no-x``; an option whose metadata says ``positional`` is an argument, not a flag."""
    fields = options_of(cls, stage)
    groups: dict[str, Any] = {}  # exclusive group name -> argparse's group
    for f in sorted(fields, key=lambda f: not f.metadata["required"]):  # the usage line starts with them
        meta = f.metadata
        names = [flag(f.name), *meta["aliases"]]
        help_text = meta["help"] + _default_text(f.default)
        if meta.get("positional"):  # an argument, not a flag: `dpokit reproduce sentiment`
            parser.add_argument(f.name, type=value_kind(f), choices=meta["choices"], metavar=meta["metavar"],
                                help=help_text)
            continue
        target = parser
        if meta.get("exclusive"):  # argparse checks the group too, so that its usage line shows ( a | b )
            target = groups.get(meta["exclusive"])
            if target is None:
                required = any(g.metadata["required"] for g in fields if g.metadata.get("exclusive") == meta["exclusive"])
                target = groups[meta["exclusive"]] = parser.add_mutually_exclusive_group(required=required)
        if value_kind(f) is bool:
            target.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
            continue
        if meta.get("repeat"):  # given once per value: --image a.png --image b.png
            target.add_argument(*names, dest=f.name, action="append", default=argparse.SUPPRESS,
                                metavar=meta["metavar"] or f.name.upper(), help=help_text)
            continue
        target.add_argument(*names, dest=f.name, type=value_kind(f), choices=meta["choices"],
                            default=argparse.SUPPRESS, required=meta["required"] and target is parser,
                            metavar=meta["metavar"] or (None if meta["choices"] else f.name.upper()), help=help_text)
    parser.add_argument("--config", metavar="FILE.yaml", help=CONFIG_HELP)
    parser.read_config = lambda path: read_yaml(path, cls, command, stage)
    parser.set_defaults(config_class=cls, stage=stage)


def config_from_args(args: argparse.Namespace) -> Any:
    """The validated config of a parsed command line: its YAML (``--config``) under its flags."""
    cls, stage = args.config_class, args.stage
    values = {f.name: getattr(args, f.name) for f in options_of(cls, stage) if hasattr(args, f.name)}
    return make(cls, values, args.command, stage)
