"""`dpokit generate`: sample continuations of prompts, or a chat model's replies."""

from __future__ import annotations

import argparse
import json
import sys

from dpokit.data.validation import check_model_spec
from dpokit.cli.options import THREADS_HELP


def _run(args: argparse.Namespace) -> None:
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


def add_command(commands) -> None:
    """Add `dpokit generate` to the subcommands of the dpokit parser."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
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
    gen.set_defaults(func=_run)

