"""`dpokit push DIR REPO_ID`: upload a finished run's final model (or any model or adapter directory), with its
model card, to the Hugging Face Hub. Its arguments are the fields of PushConfig (dpokit.config.hub)."""

from __future__ import annotations

import argparse

from dpokit.cli.options import add_options, config_from_args
from dpokit.config.hub import PushConfig, check_hub_access


def _run(args: argparse.Namespace) -> None:
    config = config_from_args(args)
    from dpokit.train.hub import model_dir, push_folder

    folder = model_dir(config.directory)
    check_hub_access(config.repo_id, "REPO_ID", revision=config.hub_revision)
    url = push_folder(folder, config.repo_id, private=config.hub_private, revision=config.hub_revision)
    print(f"pushed {folder} to {config.repo_id}: {url}")


def add_command(commands) -> None:
    """Add `dpokit push` to the subcommands of the dpokit parser."""
    parser = commands.add_parser("push", help="upload a finished run's final model (or a model or adapter "
                                              "directory) with its model card to the Hugging Face Hub")
    add_options(parser, PushConfig, "push")
    parser.set_defaults(func=_run)
