"""`dpokit` command line: a thin face over dpokit.api. Errors are one line on stderr and exit code 2.

Parsing and every check that needs no model run before torch or transformers are imported, so `--help`,
`--version` and a mistyped option answer at once (tests/cli/test_main.py checks that they are not imported).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import shlex
import sys
from typing import Any

from dpokit.cli.parser import Parser, option_yaml_reader
from dpokit.cli.commands import MODULES as COMMAND_MODULES
from dpokit.runtime.memory import reexec_with_malloc
from dpokit.config import REQUIRED, Default, TrainConfig, fields_for, make_config, read_yaml
from dpokit.errors import EXIT_INTERRUPTED, ConfigError, DpokitError, Interrupted
from dpokit.data.validation import check_data_spec, check_model_spec
from dpokit.losses.config import LOSS_TYPES, REFERENCE_FREE_LOSSES

# Commands that keep the C library's malloc: the demo's 1.3M-parameter model frees too little for a better malloc
# to pay for its own reserve (`python bench/bench_demo.py --repeats 2`: peak 622 MiB on mimalloc, 567 on glibc's).
KEEP_MALLOC = frozenset({"demo"})

EPILOG = "Any option can also be given in a YAML file with --config (keys are the option names with underscores); flags override it."


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _field_type(field: dataclasses.Field):
    text = str(field.type)
    if "bool" in text:
        return None
    if "int" in text and "float" not in text:
        return int
    if "float" in text:
        return float
    return str


def _add_config_options(parser: argparse.ArgumentParser, stage: str) -> None:
    for field in fields_for(stage):
        help_text = field.metadata["help"]
        default = field.default
        kind = _field_type(field)
        if kind is None:  # booleans: --x / --no-x
            parser.add_argument(_flag(field.name), action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=f"{help_text} (default: {default})")
            continue
        choices = field.metadata.get("choices")
        parser.add_argument(_flag(field.name), type=kind, choices=choices, default=argparse.SUPPRESS,
                            required=field.name in REQUIRED,
                            metavar=None if choices else field.name.upper(),
                            help=f"{help_text} (default: {default})" if default is not None else help_text)
    parser.add_argument("--config", metavar="FILE.yaml", help="read options from a YAML file; flags override it")
    parser.read_config = lambda path: read_yaml(path, stage)


def _train_config(stage: str, args: argparse.Namespace) -> TrainConfig:
    values: dict[str, Any] = read_yaml(args.config, stage) if getattr(args, "config", None) else {}
    values.update({k: v for k, v in vars(args).items() if k not in ("command", "config", "func")})
    return make_config(stage, values)


def _print_metrics(metrics: dict) -> None:
    if metrics and int(os.environ.get("RANK", "0")) == 0:  # once, not once per process
        print(json.dumps({"eval": metrics}))


def _quiet_progress_bars() -> None:
    """transformers' "Loading weights"/"Writing model shards" bars off (dpokit shows its own progress): through the
    environment while transformers is not imported yet, so that parsing and option checks stay fast."""
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    else:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _quiet_library_noise() -> None:
    """Two messages from the libraries under dpokit that every LoRA run printed and that no dpokit user can act on:
    peft asks transformers' deprecated ``is_gradient_checkpointing`` (a FutureWarning from the library's own
    code), and bitsandbytes, when imported on a CPU with AVX512-BF16, warns that an optional kernel it tries to
    fetch from the Hugging Face hub did not load (dpokit downloads nothing at run time and keeps bitsandbytes'
    built-in CPU path, dpokit.models.loading). Everything else is left as the libraries say it."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*is deprecated", category=FutureWarning)
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: "gemm_4bit_forward from kernels-community" not in record.getMessage())


def _warnings_as_lines() -> None:
    """dpokit's own warnings (DpokitWarning) as ``dpokit: warning: ...`` on stderr, without the source line of
    whichever library frame raised them; the libraries' warnings as Python prints them."""
    import warnings

    from dpokit.errors import DpokitWarning

    show = warnings.showwarning
    if getattr(show, "dpokit_lines", False):  # main() called again in the same process
        return

    def show_warning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DpokitWarning):
            print(f"dpokit: warning: {message}", file=file or sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    show_warning.dpokit_lines = True
    warnings.showwarning = show_warning


def _cmd_dpo(args):
    from dpokit.data.validation import check_train_inputs

    config = _train_config("dpo", args)
    check_train_inputs(config)
    from dpokit.api import train_dpo

    _print_metrics(train_dpo(config))


def _cmd_sft(args):
    from dpokit.data.validation import check_train_inputs

    config = _train_config("sft", args)
    check_train_inputs(config)
    from dpokit.api import train_sft

    _print_metrics(train_sft(config))


def _cmd_eval(args):
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


def _cmd_generate(args):
    from dpokit.data.prompts import parse_prompt, read_prompts

    check_model_spec("--model", args.model, gguf_file=args.gguf_file)
    prompts = read_prompts(args.prompts) if args.prompts else [parse_prompt(args.prompt)]
    from dpokit.eval.generation import generate_samples

    if args.threads is not None:  # holds for the sampling below; stderr keeps stdout to the samples
        from dpokit.runtime.threads import apply_threads

        apply_threads(args.threads, log=lambda line: print(line, file=sys.stderr))

    outputs = generate_samples(args.model, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                               top_p=args.top_p, num_samples=args.num_samples, seed=args.seed,
                               batch_size=args.batch_size, chat_template=args.chat_template, system=args.system,
                               gguf_file=args.gguf_file)
    for prompt, samples in zip(prompts, outputs):
        for sample in samples:
            if sample.messages is not None:  # templated: the conversation sent and the reply
                print(json.dumps({"prompt": sample.messages, "completion": sample.text}, ensure_ascii=False))
            elif args.jsonl:
                print(json.dumps({"prompt": prompt, "completion": sample.text}, ensure_ascii=False))
            else:
                print(prompt + sample.text)


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
THREADS_HELP = "torch CPU threads (default: chosen from the model's width and the free CPUs; OMP_NUM_THREADS is respected)"


def _add_demo_options(parser: argparse.ArgumentParser) -> None:
    from dpokit.experiments.demo_config import DemoConfig

    for field in dataclasses.fields(DemoConfig):
        kind = {int: int, float: float}.get(type(field.default), str)
        parser.add_argument(_flag(field.name), type=kind, default=field.default, help=DEMO_HELP[field.name])


def _cmd_demo(args):
    from dpokit.experiments.demo_config import DemoConfig

    config = DemoConfig(**{k: v for k, v in vars(args).items() if k not in ("command", "func", "config")})
    if config.model is not None:
        check_model_spec("--model", config.model)
    from dpokit.experiments.demo import run_demo

    run_demo(config)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every dpokit command."""
    from dpokit import __version__

    parser = Parser(prog="dpokit", description="Direct Preference Optimization for causal LMs.",
                    epilog="environment: DPOKIT_MALLOC=auto|mimalloc|jemalloc|system|FILE chooses the malloc dpokit "
                           "runs on (default auto: mimalloc, else jemalloc, else the C library's; README: Speed and "
                           "memory)")
    parser.add_argument("--version", action="version", version=f"dpokit {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.ArgumentDefaultsHelpFormatter

    dpo = commands.add_parser("dpo", help="fine-tune a model with DPO on preference pairs", epilog=EPILOG)
    _add_config_options(dpo, "dpo")
    dpo.set_defaults(func=_cmd_dpo)
    sft = commands.add_parser("sft", help="supervised fine-tuning on completions or chosen responses", epilog=EPILOG)
    _add_config_options(sft, "sft")
    sft.set_defaults(func=_cmd_sft)

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
    ev.set_defaults(func=_cmd_eval)

    demo = commands.add_parser("demo", formatter_class=fmt,
                               help="the paper's controlled-sentiment experiment on the embedded model (CPU, minutes)")
    _add_demo_options(demo)
    demo.set_defaults(func=_cmd_demo)

    gen = commands.add_parser(
        "generate", formatter_class=fmt, help="sample continuations of prompts, or a chat model's replies",
        epilog="With a chat model (a tokenizer with a chat template) every prompt is rendered with the template "
               "and each reply is printed as one JSON line {\"prompt\": [messages sent], \"completion\": reply}, "
               "which dpokit sft reads as conversational data. Generation stops at EOS and at the template's "
               "end-of-turn token.")
    gen.add_argument("--model", required=True, help="model directory, LoRA adapter directory or hub name")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help='one prompt: text, or a JSON list of messages '
                                         '(\'[{"role": "user", "content": "hi"}]\')')
    source.add_argument("--prompts", metavar="FILE",
                        help="prompts: FILE.jsonl with one JSON string, message list or {\"prompt\"|\"messages\": ...} "
                             "object per line; any other file: one plain-text prompt per line")
    gen.add_argument("--gguf-file", help="load --model from this GGUF file in the --model directory (dequantised)")
    gen.add_argument("--system", help="a system message put before each prompt that has none (chat models)")
    gen.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None,
                     help="render prompts with the tokenizer's chat template (default: when it has one); "
                          "--no-chat-template sends the raw text")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate")
    gen.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0 = greedy)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    gen.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    gen.add_argument("--batch-size", type=int, default=16, help="sequences sampled together (prompts x samples)")
    gen.add_argument("--threads", type=int, help=THREADS_HELP)
    gen.add_argument("--seed", type=int, default=0, help="random seed (the same seed gives the same samples)")
    gen.add_argument("--jsonl", action="store_true",
                     help="print one JSON object per sample (always so when the chat template is applied)")
    gen.set_defaults(func=_cmd_generate)

    for module in COMMAND_MODULES:  # commands that live in their own module (dpokit/commands/)
        importlib.import_module(f"dpokit.cli.{module}").add_command(commands)

    for name, command in commands.choices.items():  # --config for every command
        if command.read_config is None:
            command.add_argument("--config", metavar="FILE.yaml",
                                 help="read options from a YAML file (keys are the option names); flags override it")
            command.read_config = option_yaml_reader(command, name)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `dpokit` command."""
    args = build_parser().parse_args(argv)
    _quiet_progress_bars()
    _quiet_library_noise()
    _warnings_as_lines()
    try:
        if argv is None and args.command not in KEEP_MALLOC:  # the command line, not a call from Python
            reexec_with_malloc()  # a leaner malloc (dpokit.runtime.memory)
        args.func(args)
    except Interrupted as stop:
        argv = list(sys.argv[1:] if argv is None else argv)
        again = "dpokit " + " ".join(shlex.quote(a) for a in argv + ([] if "--resume" in argv else ["--resume"]))
        print(f"dpokit {args.command}: {stop}\nresume with: {again}"
              + ("   (under the same accelerate launch)" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""),
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except ConfigError as error:  # an option's fault: where to read about the options
        print(f"dpokit {args.command}: error: {error} (see dpokit {args.command} --help)", file=sys.stderr)
        return 2
    except DpokitError as error:
        print(f"dpokit {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the file system's word (full disk, permissions): one line, not a traceback
        where = f"{error.filename}: " if error.filename else ""
        print(f"dpokit {args.command}: error: {where}{error.strerror or error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dpokit {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
