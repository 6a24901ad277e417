"""`dpokit eval`: loss, reward accuracy, margins and log-probs of a policy against a reference, without training."""

from __future__ import annotations

import argparse
import json

from dpokit.config.loss import LOSS_TYPES, REFERENCE_FREE_LOSSES
from dpokit.config.options import Default
from dpokit.data.validation import check_data_spec, check_model_spec
from dpokit.errors import ConfigError
from dpokit.cli.options import THREADS_HELP


def _run(args: argparse.Namespace) -> None:
    check_model_spec("--model", args.model, gguf_file=args.gguf_file)
    if args.ref_model is not None:
        check_model_spec("--ref-model", args.ref_model)
    elif not args.reference_free and args.loss not in REFERENCE_FREE_LOSSES:
        raise ConfigError("evaluation needs --ref-model (or --reference-free)")
    check_data_spec("--data", args.data)
    from dpokit.api import evaluate

    log = (lambda *_: None) if args.json else print
    metrics = evaluate(args.model, args.data, ref_model=args.ref_model, loss=args.loss, beta=args.beta,
                       label_smoothing=args.label_smoothing, reference_free=args.reference_free,
                       simpo_gamma=args.simpo_gamma, loss_weights=args.loss_weights,
                       dpop_lambda=args.dpop_lambda, ld_alpha=args.ld_alpha,
                       use_weighting=args.use_weighting, desirable_weight=args.desirable_weight,
                       undesirable_weight=args.undesirable_weight, batch_size=args.batch_size,
                       max_length=args.max_length,
                       max_prompt_length=args.max_prompt_length, truncation=args.truncation, format=args.format,
                       dtype=args.dtype, on_filtered=args.on_filtered, gguf_file=args.gguf_file,
                       apply_chat_template=args.apply_chat_template, threads=args.threads,
                       attention=args.attention, log=log)
    if args.json:
        print(json.dumps(metrics))
    else:
        for key, value in metrics.items():
            print(f"{key:22s} {value:.6g}")


def add_command(commands) -> None:
    """Add `dpokit eval` to the subcommands of the dpokit parser."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    ev = commands.add_parser("eval", formatter_class=fmt,
                             help="loss, reward accuracy, margins and log-probs of a policy vs a reference")
    ev.add_argument("--model", required=True, help="policy: model directory, LoRA adapter directory or hub name")
    ev.add_argument("--ref-model", help="reference model or adapter directory (required unless --reference-free)")
    ev.add_argument("--data", required=True, help="preference data (any format dpokit dpo takes; unpaired data "
                    "with --loss kto)")
    ev.add_argument("--loss", default="sigmoid", help=f"preference loss: one of {', '.join(LOSS_TYPES)}, or "
                    "several comma-separated (README: Losses)")
    ev.add_argument("--loss-weights", help="comma-separated weight of each loss given to --loss (default: 1 each)")
    ev.add_argument("--beta", type=float, default=0.1, help="β (orpo: λ)")
    ev.add_argument("--label-smoothing", type=float, default=0.0,
                    help="ε for sigmoid (cDPO), robust, exo_pair or simpo")
    ev.add_argument("--simpo-gamma", type=float, help="SimPO's target reward margin γ (default 0.5)")
    ev.add_argument("--dpop-lambda", type=float, help="DPO-Positive's penalty weight λ (default 50)")
    ev.add_argument("--ld-alpha", type=float, help="LD-DPO length desensitisation α in [0, 1]")
    ev.add_argument("--use-weighting", action="store_true", help="WPO weighting of each pair's loss")
    ev.add_argument("--desirable-weight", type=float, help="KTO: weight of the desirable examples' losses (default 1)")
    ev.add_argument("--undesirable-weight", type=float,
                    help="KTO: weight of the undesirable examples' losses (default 1)")
    ev.add_argument("--reference-free", action="store_true",
                    help="score without a reference model (implied by simpo and orpo)")
    ev.add_argument("--batch-size", type=int, default=8, help="examples per batch")
    ev.add_argument("--gguf-file", help="load --model from this GGUF file in the --model directory (dequantised)")
    ev.add_argument("--max-length", type=int, default=Default(512),
                    help="maximum prompt + response tokens (the default is lowered to the model's maximum positions)")
    ev.add_argument("--max-prompt-length", type=int, default=Default(256),
                    help="prompt length for too-long examples (the default is lowered to half of --max-length)")
    ev.add_argument("--truncation", default="keep_end", choices=("keep_end", "keep_start"), help="prompt end kept")
    ev.add_argument("--format", default="auto", help="data format (auto-detected by default)")
    ev.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="model dtype")
    ev.add_argument("--on-filtered", default="skip", choices=("skip", "error"), help="identical/too-long pairs")
    ev.add_argument("--apply-chat-template", action="store_true",
                    help="render plain-text data with the chat template (prompt = user turn, response = assistant "
                         "turn), as dpokit dpo --apply-chat-template does")
    ev.add_argument("--attention", default="auto", choices=("auto", "sdpa", "eager", "flex", "segments"),
                    help="attention kernel, as dpokit dpo --attention")
    ev.add_argument("--json", action="store_true", help="print one JSON object and nothing else")
    ev.add_argument("--threads", type=int, help=THREADS_HELP)
    ev.set_defaults(func=_run)

