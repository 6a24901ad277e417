"""`dpokit reproduce`: the DPO paper's experiments in miniature. `dpokit reproduce sentiment`: the reward–KL
frontier of §6.1 (Fig. 2, left) on the embedded review model (dpokit.experiments.paper.frontier)."""

from __future__ import annotations

import argparse

from dpokit.errors import ConfigError
from dpokit.experiments.paper.frontier import METHODS, SIZES, run_frontier  # imports torch only when it runs


def _methods(text: str) -> tuple[str, ...]:
    methods = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(f"--methods: unknown {', '.join(unknown) or '(none given)'}; "
                          f"choose from {', '.join(METHODS)}")
    return methods


def _run(args: argparse.Namespace) -> None:
    methods = _methods(args.methods)
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be at least 1; got {args.threads}")
    if args.quick and args.sizes not in ("full", "quick"):
        raise ConfigError(f"--quick and --sizes {args.sizes} contradict each other: give one")
    run_frontier(args.output, "quick" if args.quick else args.sizes, methods=methods, seed=args.seed,
                 threads=args.threads, overwrite=args.overwrite)


def add_command(commands) -> None:
    """Add `dpokit reproduce` to the subcommands of the dpokit parser."""
    parser = commands.add_parser("reproduce", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                 help="the DPO paper's experiments in miniature (sentiment: the reward-KL frontier)")
    parser.add_argument("experiment", choices=("sentiment",),
                        help="sentiment: §6.1's reward-KL frontier of DPO, PPO, PPO-GT, Preferred-FT, Unlikelihood "
                             "and Best-of-N on the embedded review model")
    parser.add_argument("--output", required=True, help="directory for frontier.json, frontier.png, report.md and "
                                                        "the trained models")
    parser.add_argument("--quick", action="store_true", help="the reduced sweep (same as --sizes quick)")
    parser.add_argument("--sizes", default="full", choices=tuple(SIZES),
                        help="full: every knob value of the paper's sweep; quick: about 10 minutes on 2 CPU cores; "
                             "tiny: seconds, to check the pipeline (meaningless numbers)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods to run")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace what --output holds (default: a directory that holds anything is refused)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of every stage")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: chosen from the model's width and the free CPUs)")
    parser.set_defaults(func=_run)
