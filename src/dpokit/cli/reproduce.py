"""`dpokit reproduce`: the DPO paper's experiments in miniature. `dpokit reproduce sentiment`: the reward–KL
frontier of §6.1 (Fig. 2, left) on the embedded review model (dpokit.experiments.paper.frontier); `dpokit reproduce
dpo-vs-ppo`: the study of why DPO does not dominate PPO there (dpokit.experiments.paper.study). Its arguments
derive from the fields of one ReproduceConfig (dpokit.config.experiments)."""

from __future__ import annotations

import argparse

from dpokit.cli.options import add_options, config_from_args
from dpokit.config.experiments import ReproduceConfig


def _run(args: argparse.Namespace) -> None:
    config = config_from_args(args)
    if config.experiment == "dpo-vs-ppo":
        from dpokit.experiments.paper.study import run_study  # imports torch only when it runs

        run_study(config.output, config.sweep(), seed=config.seed, threads=config.threads, overwrite=config.overwrite)
        return
    from dpokit.experiments.paper.frontier import run_frontier

    run_frontier(config.output, config.sweep(), methods=config.method_list(), seed=config.seed,
                 threads=config.threads, overwrite=config.overwrite)


def add_command(commands) -> None:
    """Add `dpokit reproduce` to the subcommands of the dpokit parser."""
    parser = commands.add_parser("reproduce",
                                 help="the DPO paper's experiments in miniature (sentiment: the reward-KL frontier; dpo-vs-ppo: the study)")
    add_options(parser, ReproduceConfig, "reproduce")
    parser.set_defaults(func=_run)
