"""`dpokit demo`: the paper's controlled-sentiment experiment on the embedded model (dpokit.experiments.demo)."""

from __future__ import annotations

import argparse
import dataclasses

from dpokit.config.options import flag
from dpokit.data.validation import check_model_spec


DEMO_HELP = {
    "output": "output directory: report.json, plots, the SFT and DPO models",
    "model": "base model to start from (default: the embedded tiny review model)",
    "judge": "judge: vader, module.path:function (text -> float), or classifier:PATH:LABEL",
    "seed": "random seed of every stage",
    "sft_reviews": "generated reviews for the SFT step",
    "sft_steps": "SFT optimizer steps",
    "sft_lr": "SFT learning rate (AdamW)",
    "prompts": "training prompts P (review openings of 2-8 tokens)",
    "completions": "continuations sampled per prompt (4 gives up to 6 pairs)",
    "labeling": "argmax: the higher judge score is chosen; bradley-terry: sampled with P = σ(scale·Δscore)",
    "min_score_gap": "pairs whose judge scores differ by less than this are ties: no pair",
    "bt_scale": "score scale of the Bradley-Terry labeling",
    "dpo_steps": "DPO optimizer steps",
    "beta": "DPO β",
    "lr": "DPO learning rate (AdamW)",
    "batch_size": "pairs (or reviews) per optimizer step",
    "eval_prompts": "held-out prompts, never used in training",
    "eval_samples": "continuations per held-out prompt for the judge scores and KL",
    "max_new_tokens": "tokens per continuation",
    "temperature": "sampling temperature",
    "examples_shown": "held-out examples printed side by side",
    "threads": "torch CPU threads (0: chosen from the model's width and the free CPUs)",
}


def _add_demo_options(parser: argparse.ArgumentParser) -> None:
    from dpokit.experiments.demo_config import DemoConfig

    for field in dataclasses.fields(DemoConfig):
        kind = {int: int, float: float}.get(type(field.default), str)
        parser.add_argument(flag(field.name), type=kind, default=field.default, help=DEMO_HELP[field.name])


def _run(args: argparse.Namespace) -> None:
    from dpokit.experiments.demo_config import DemoConfig

    config = DemoConfig(**{k: v for k, v in vars(args).items() if k not in ("command", "func", "config")})
    if config.model is not None:
        check_model_spec("--model", config.model)
    from dpokit.experiments.demo import run_demo

    run_demo(config)


def add_command(commands) -> None:
    """Add `dpokit demo` to the subcommands of the dpokit parser."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    demo = commands.add_parser("demo", formatter_class=fmt,
                               help="the paper's controlled-sentiment experiment on the embedded model (CPU, minutes)")
    _add_demo_options(demo)
    demo.set_defaults(func=_run)

