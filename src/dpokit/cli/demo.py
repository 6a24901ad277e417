"""`dpokit demo`: the paper's controlled-sentiment experiment on the embedded model (dpokit.experiments.demo). Its
flags derive from the fields of one DemoConfig (dpokit.config.experiments)."""

from __future__ import annotations

import argparse
from typing import Any

from dpokit.cli.options import add_options, config_from_args
from dpokit.config.experiments import DemoConfig
from dpokit.data.validation import check_model_spec


def checked_config(args: argparse.Namespace) -> Any:
    """The config of a parsed `dpokit demo` or `dpokit iterate` line, its ``--model`` (when given) checked to exist."""
    from dpokit.cli.vision import refuse_vision_model

    config = config_from_args(args)
    if config.model is not None:
        check_model_spec("--model", config.model)
        refuse_vision_model(args.command, "--model", config.model)
    return config


def _run(args: argparse.Namespace) -> None:
    config = checked_config(args)
    from dpokit.experiments.demo import run_demo

    run_demo(config)


def add_command(commands) -> None:
    """Add `dpokit demo` to the subcommands of the dpokit parser."""
    demo = commands.add_parser("demo",
                               help="the paper's controlled-sentiment experiment on the embedded model (CPU, minutes)")
    add_options(demo, DemoConfig, "demo")
    demo.set_defaults(func=_run)
