"""`dpokit iterate`: iterative (online) DPO: rounds of sampling from the current policy, labelling pairs with a
judge, DPO from the current policy, and evaluation on held-out prompts (dpokit.experiments.iterate_run). Its flags
derive from the fields of one IterateConfig (dpokit.config.experiments)."""

from __future__ import annotations

import argparse

from dpokit.cli.demo import checked_config
from dpokit.cli.options import add_options
from dpokit.config.experiments import IterateConfig


def _run(args: argparse.Namespace) -> None:
    config = checked_config(args)
    from dpokit.experiments.iterate_run import run_iterate

    run_iterate(config)


def add_command(commands) -> None:
    """Add `dpokit iterate` to the subcommands of the dpokit parser."""
    parser = commands.add_parser("iterate", help="iterative (online) DPO: rounds of sampling from the policy, "
                                                 "labelling with a judge, DPO and held-out evaluation")
    add_options(parser, IterateConfig, "iterate")
    parser.set_defaults(func=_run)
