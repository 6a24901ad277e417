"""`dpokit reward`: train a Bradley–Terry reward model on preference pairs. Its flags are the fields of RewardConfig
(dpokit.config.reward); the run is dpokit.train.reward's."""

from __future__ import annotations

import argparse

from dpokit.cli.options import add_options, config_from_args
from dpokit.cli.train import EPILOG, print_metrics
from dpokit.config.reward import RewardConfig


def _run(args: argparse.Namespace) -> None:
    from dpokit.data.validation import check_train_inputs

    config = config_from_args(args)
    check_train_inputs(config)
    config.check_hub()  # a push that cannot work, refused before torch is imported
    from dpokit.cli.vision import refuse_training_images

    refuse_training_images("reward", config)  # images are not handled yet: one line, before any model work
    from dpokit.train.reward import train_reward

    print_metrics(train_reward(config))


def add_command(commands) -> None:
    """Add `dpokit reward` to the subcommands of the dpokit parser."""
    parser = commands.add_parser(
        "reward", help="train a reward model (Bradley–Terry) on preference pairs",
        epilog="The model is AutoModelForSequenceClassification with one output, started from --model; OUTPUT/final "
               "is a reward model that `dpokit score --model` and the reward:PATH judge use. " + EPILOG)
    add_options(parser, RewardConfig, "reward")
    parser.set_defaults(func=_run)
