"""`dpokit merge`: fold a LoRA adapter into its base model."""

from __future__ import annotations

import argparse

from dpokit.data.validation import check_model_spec


def _run(args: argparse.Namespace) -> None:
    check_model_spec("--adapter", args.adapter)
    from dpokit.train.policy import merge

    merge(args.adapter, args.output, dtype=args.dtype)


def add_command(commands) -> None:
    """Add `dpokit merge` to the subcommands of the dpokit parser."""
    parser = commands.add_parser("merge", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                 help="fold a LoRA adapter into its base model: a plain Hugging Face model directory")
    parser.add_argument("--adapter", required=True,
                        help="LoRA adapter directory (a LoRA run's final/ or checkpoint)")
    parser.add_argument("--output", required=True, help="directory for the merged model")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="dtype of the merged weights")
    parser.set_defaults(func=_run)
