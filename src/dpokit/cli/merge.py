"""`dpokit merge`: fold a LoRA adapter into its base model. Its flags are the fields of MergeConfig."""

from __future__ import annotations

import argparse

from dpokit.cli.options import add_options, config_from_args
from dpokit.config.eval import MergeConfig


def _run(args: argparse.Namespace) -> None:
    from dpokit.data.validation import check_model_spec

    config = config_from_args(args)
    check_model_spec("--adapter", config.adapter)
    from dpokit.train.policy import merge

    merge(config.adapter, config.output, dtype=config.dtype)


def add_command(commands) -> None:
    """Add `dpokit merge` to the subcommands of the dpokit parser."""
    parser = commands.add_parser("merge", help="fold a LoRA adapter into its base model: a plain Hugging Face model "
                                               "directory")
    add_options(parser, MergeConfig, "merge")
    parser.set_defaults(func=_run)
