"""`dpokit generate`: sample continuations of prompts, or a chat model's replies. Its flags are the fields of
GenerateConfig (dpokit.config.eval)."""

from __future__ import annotations

import argparse
import json
import sys

from dpokit.cli.options import add_options, config_from_args
from dpokit.config.eval import GenerateConfig


def _run(args: argparse.Namespace) -> None:
    import os

    from dpokit.data.prompts import parse_prompt, read_prompts, with_images
    from dpokit.data.validation import check_model_spec

    config = config_from_args(args)
    check_model_spec("--model", config.model, gguf_file=config.gguf_file)
    if config.prompts:
        prompts = read_prompts(config.prompts, images=True)
    else:  # --image paths: relative to the working directory
        prompt = parse_prompt(config.prompt)
        prompts = [with_images(prompt, config.image, "--image", os.getcwd(), "image") if config.image else prompt]
    from dpokit.eval.generation import generate_samples

    if config.threads is not None:  # holds for the sampling below; stderr keeps stdout to the samples
        from dpokit.runtime.threads import apply_threads

        apply_threads(config.threads, log=lambda line: print(line, file=sys.stderr))

    outputs = generate_samples(config.model, prompts, gguf_file=config.gguf_file, **config.sampling())
    for prompt, samples in zip(prompts, outputs):
        for sample in samples:
            if sample.messages is not None:  # templated: the conversation sent (its tools too) and the reply
                tools = {"tools": sample.messages.tools} if getattr(sample.messages, "tools", None) else {}
                images = {"images": prompt.given} if getattr(prompt, "given", None) else {}
                print(json.dumps({"prompt": sample.messages, "completion": sample.text, **tools, **images},
                                 ensure_ascii=False))
            elif config.jsonl:
                print(json.dumps({"prompt": prompt, "completion": sample.text}, ensure_ascii=False))
            else:
                print(prompt + sample.text)


def add_command(commands) -> None:
    """Add `dpokit generate` to the subcommands of the dpokit parser."""
    parser = commands.add_parser(
        "generate", help="sample continuations of prompts, or a chat model's replies",
        epilog="With a chat model (a tokenizer with a chat template) every prompt is rendered with the template "
               "and each reply is printed as one JSON line {\"prompt\": [messages sent], \"completion\": reply}, "
               "which dpokit sft reads as conversational data. Generation stops at EOS and at the template's "
               "end-of-turn token. A vision-language model takes images: --image PATH (repeatable) for --prompt, "
               "an \"images\" list of paths (relative to the file) in a --prompts object; its lines carry them as "
               "\"images\".")
    add_options(parser, GenerateConfig, "generate")
    parser.set_defaults(func=_run)
