"""`dpokit iterate`: iterative (online) DPO: rounds of sampling from the current policy, labelling pairs with a
judge, DPO from the current policy, and evaluation on held-out prompts (dpokit.experiments.iterate_run)."""

from __future__ import annotations

import argparse
import dataclasses

HELP = {
    "prompts": "training prompts: FILE.jsonl (JSON strings, message lists or {\"prompt\"|\"messages\": ...} objects) "
               "or one plain-text prompt per line",
    "output": "output directory: round-NNN/{pairs.jsonl, model/, metrics.json}, summary.json, judge_scores.png",
    "model": "starting policy: model directory, adapter directory or hub name (default: the embedded tiny review "
             "model; usually an SFT model)",
    "eval_prompts": "held-out prompts file (same formats as --prompts); default: --eval-fraction of --prompts",
    "eval_fraction": "share of --prompts held out for evaluation when --eval-prompts is not given (seeded)",
    "rounds": "rounds of sample -> label -> DPO -> evaluate",
    "samples_per_prompt": "continuations sampled per training prompt each round (K; up to K(K-1)/2 pairs)",
    "judge": "judge: vader, module.path:function (text -> float), classifier:PATH:LABEL, reward:PATH, "
             "implicit:POLICY:REF[:BETA] (any spec dpokit.judges.loader.load_judge takes)",
    "reference": "DPO reference of each round: fixed (the starting model) or previous (the round's starting policy)",
    "labeling": "argmax: the higher judge score is chosen; bradley-terry: sampled with P = σ(scale·Δscore)",
    "min_score_gap": "pairs whose judge scores differ by less than this are ties: no pair",
    "bt_scale": "score scale of the Bradley-Terry labeling",
    "beta": "DPO β",
    "lr": "DPO learning rate (AdamW)",
    "steps": "DPO optimizer steps per round",
    "batch_size": "pairs per optimizer step",
    "warmup_steps": "linear warm-up steps of each round's DPO",
    "eval_samples": "continuations per held-out prompt for the judge scores and KL",
    "max_new_tokens": "tokens per sampled continuation",
    "temperature": "sampling temperature (> 0: exact samples, no top-k/top-p)",
    "max_length": "maximum prompt + response tokens in training (at most the model's positions)",
    "max_prompt_length": "prompt tokens kept when prompt + response is too long",
    "seed": "random seed (round r samples with seed + 1000·(r-1))",
    "threads": "torch CPU threads (0: chosen from the model's width and the free CPUs)",
    "resume": "continue the run in --output: complete rounds are kept, an interrupted one is redone",
    "overwrite": "replace the run in --output",
}


def _run(args: argparse.Namespace) -> None:
    from dpokit.data.validation import check_model_spec
    from dpokit.experiments.iterate_config import IterateConfig

    fields = {f.name for f in dataclasses.fields(IterateConfig)}
    config = IterateConfig(**{k: v for k, v in vars(args).items() if k in fields})
    if config.model is not None:
        check_model_spec("--model", config.model)
    from dpokit.experiments.iterate_run import run_iterate

    run_iterate(config)


def add_command(commands) -> None:
    """Add `dpokit iterate` to the subcommands of the dpokit parser."""
    from dpokit.experiments.iterate_config import LABELINGS, REFERENCES, IterateConfig

    parser = commands.add_parser("iterate", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                 help="iterative (online) DPO: rounds of sampling from the policy, labelling with a "
                                      "judge, DPO and held-out evaluation")
    fields = {field.name: field for field in dataclasses.fields(IterateConfig)}
    for name, text in HELP.items():  # HELP's order, not the fields' (IterateConfig's round settings come first)
        field = fields[name]
        flag = "--" + name.replace("_", "-")
        if isinstance(field.default, bool):
            parser.add_argument(flag, action="store_true", help=text)
        elif name == "prompts":
            parser.add_argument(flag, required=True, metavar="FILE", help=text)
        else:
            kind = {int: int, float: float}.get(type(field.default), str)
            choices = {"reference": REFERENCES, "labeling": LABELINGS}.get(name)
            parser.add_argument(flag, type=kind, default=field.default, choices=choices, help=text)
    parser.set_defaults(func=_run)
