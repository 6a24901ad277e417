"""`dpokit eval`: loss, reward accuracy, margins and log-probs of a policy against a reference, without training.
Its flags are the fields of EvalConfig (dpokit.config.eval)."""

from __future__ import annotations

import argparse
import json

from dpokit.cli.options import add_options, config_from_args
from dpokit.config.eval import EvalConfig


def _run(args: argparse.Namespace) -> None:
    from dpokit.data.validation import check_eval_inputs

    config = config_from_args(args)
    check_eval_inputs(config)  # before torch is imported: a mistyped path answers at once
    from dpokit.eval.evaluate import evaluate

    metrics = evaluate(config, log=(lambda *_: None) if config.json else print)
    if config.json:
        print(json.dumps(metrics))
    else:
        for key, value in metrics.items():
            print(f"{key:22s} {value:.6g}")


def add_command(commands) -> None:
    """Add `dpokit eval` to the subcommands of the dpokit parser."""
    parser = commands.add_parser("eval", help="loss, reward accuracy, margins and log-probs of a policy vs a reference")
    add_options(parser, EvalConfig, "eval")
    parser.set_defaults(func=_run)
