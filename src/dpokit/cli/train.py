"""`dpokit dpo` and `dpokit sft`: one TrainConfig (dpokit.config.train), the flags of each derived from its fields."""

from __future__ import annotations

import argparse
import json
import os

from dpokit.cli.options import add_options, config_from_args
from dpokit.config.train import TrainConfig

EPILOG = ("Any option can also be given in a YAML file with --config (keys are the option names, with _ or -); "
          "flags override it.")


def print_metrics(metrics: dict) -> None:
    """Print the final evaluation metrics as one JSON line, once (not once per process)."""
    if metrics and int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"eval": metrics}))


def _run(args: argparse.Namespace) -> None:
    from dpokit.data.validation import check_train_inputs

    config = config_from_args(args)
    check_train_inputs(config)
    config.check_hub()  # a push that cannot work, refused before torch is imported
    from dpokit.train.run import train_dpo, train_sft

    print_metrics((train_dpo if args.stage == "dpo" else train_sft)(config))


def add_command(commands) -> None:
    """Add `dpokit dpo` and `dpokit sft` to the subcommands of the dpokit parser."""
    for stage, text in (("dpo", "fine-tune a model with DPO on preference pairs"),
                        ("sft", "supervised fine-tuning on completions or chosen responses")):
        parser = commands.add_parser(stage, help=text, epilog=EPILOG)
        add_options(parser, TrainConfig, stage, stage)
        parser.set_defaults(func=_run)
