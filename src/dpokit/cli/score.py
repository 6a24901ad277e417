"""`dpokit score`: the implicit reward β·(log π(y|x) − log π_ref(y|x)) of every (prompt, response) of a file.

Also the options, scoring and output writing that `dpokit rank` shares (dpokit.cli.rank).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from dpokit.config import Default
from dpokit.data.validation import check_data_spec, check_model_spec

THREADS_HELP = "torch CPU threads (default: chosen from the model's width and the free CPUs; OMP_NUM_THREADS is respected)"


def add_scoring_options(parser: argparse.ArgumentParser) -> None:
    """The options `dpokit score` and `dpokit rank` share."""
    parser.add_argument("--model", required=True, help="the DPO policy π: model directory, LoRA adapter directory or "
                                                       "hub name")
    parser.add_argument("--ref-model", required=True, help="its reference π_ref (the model DPO started from)")
    parser.add_argument("--output", required=True, help="JSONL file to write ('-': standard output)")
    parser.add_argument("--beta", type=float, default=0.1, help="β of the implicit reward (the policy's training β)")
    parser.add_argument("--batch-size", type=int, default=16, help="responses per forward pass (shortest first)")
    parser.add_argument("--max-length", type=int, default=Default(512),
                        help="maximum prompt + response tokens (the default is lowered to the model's maximum positions)")
    parser.add_argument("--max-prompt-length", type=int, default=Default(256),
                        help="prompt length a too-long example's prompt is cut to (the default is lowered to half of "
                             "--max-length)")
    parser.add_argument("--truncation", default="keep_end", choices=("keep_end", "keep_start"), help="prompt end kept")
    parser.add_argument("--on-filtered", default="skip", choices=("skip", "error"),
                        help="a response too long even after prompt truncation: skip (written with reward null and "
                             "the reason) or error")
    parser.add_argument("--apply-chat-template", action="store_true",
                        help="render plain-text rows with the chat template (prompt = user turn, response = assistant "
                             "turn), as dpokit dpo --apply-chat-template does")
    parser.add_argument("--split", default="train", help="split of a Hub data set or saved DatasetDict")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="model dtype")
    parser.add_argument("--attention", default="auto", choices=("auto", "sdpa", "eager", "flex"),
                        help="attention kernel: auto (FlexAttention block masks on CUDA), sdpa, eager or flex")
    parser.add_argument("--threads", type=int, help=THREADS_HELP)


def check_options(args: argparse.Namespace) -> None:
    """What can be checked before anything is loaded."""
    from dpokit.errors import ConfigError

    check_model_spec("--model", args.model)
    check_model_spec("--ref-model", args.ref_model)
    check_data_spec("--data", args.data)
    if not args.beta > 0:
        raise ConfigError(f"--beta must be positive, got {args.beta}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.output != "-" and Path(args.output).is_dir():
        raise ConfigError(f"--output {args.output}: a directory; give a file name")


def logger(args: argparse.Namespace):
    """Where progress lines go: standard error when the scores go to standard output, else standard output."""
    stream = sys.stderr if args.output == "-" else sys.stdout
    return lambda line: print(line, file=stream, flush=True)


def score_rows(args: argparse.Namespace, rows, log) -> list:
    """The ImplicitReward of every response of `rows` (dpokit.data.responses.ResponseRow), flattened in order."""
    from dpokit.eval.scoring import default_device, fit_settings, implicit_rewards, load_pair
    from dpokit.runtime.threads import apply_threads, model_width

    settings = fit_settings(args.model, max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                            truncation=args.truncation, on_filtered=args.on_filtered,
                            apply_chat_template=args.apply_chat_template, log=log)
    device = default_device()
    policy, reference, tokenizer = load_pair(args.model, args.ref_model, dtype=args.dtype, device=device,
                                             attention=args.attention)
    apply_threads(args.threads, width=model_width(policy), device=device, log=log)
    prompts = [row.prompt for row in rows for _ in row.responses]
    responses = [r for row in rows for r in row.responses]
    sources = [s for row in rows for s in row.response_sources()]
    results = implicit_rewards(policy, reference, tokenizer, prompts, responses, args.beta, settings=settings,
                               batch_size=args.batch_size, sources=sources, progress=True)
    skipped = [s for s, r in zip(sources, results) if r.skipped is not None]
    truncated = sum(r.prompt_truncated for r in results)
    log(f"scored {len(results) - len(skipped)} of {len(results)} responses (β={args.beta})"
        + (f"; prompt truncated in {truncated}" if truncated else "")
        + (f"; skipped {len(skipped)}, written with reward null ({settings.max_length} tokens are not enough even "
           f"after prompt truncation; e.g. {', '.join(skipped[:3])})" if skipped else ""))
    return results


def write_jsonl(path: str, rows: Iterable[dict]) -> None:
    """Write `rows` as JSON lines to `path` ("-": standard output), a file through a temporary name, so that a
    failed run leaves no half-written output."""
    if path == "-":
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        with tmp.open("w") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def run_scoring(args: argparse.Namespace, read: Callable[..., list], output_rows: Callable[[list, list], Iterable[dict]]
                ) -> None:
    """The body of `dpokit score` and `dpokit rank`: check the options, read --data with `read`
    (dpokit.data.responses), score every response and write the rows `output_rows(rows, results)` makes."""
    check_options(args)
    log = logger(args)
    rows = read(args.data, split=args.split)
    results = score_rows(args, rows, log)
    write_jsonl(args.output, output_rows(rows, results))
    if args.output != "-":
        log(f"wrote {args.output}")


def _scored_rows(rows, results) -> Iterable[dict]:
    return ({"index": i, "prompt": row.given_prompt, "response": row.given_responses[0], **result.row()}
            for i, (row, result) in enumerate(zip(rows, results)))


def _run(args: argparse.Namespace) -> None:
    from dpokit.data.responses import read_responses

    run_scoring(args, read_responses, _scored_rows)


def add_command(commands) -> None:
    """Add `dpokit score` to the subcommands of the dpokit parser."""
    parser = commands.add_parser(
        "score", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="the implicit reward β·log π(y|x)/π_ref(y|x) of responses: a DPO policy as a reward model",
        epilog="Writes one JSON line per input row, in order: index, prompt, response, reward, logp_policy, "
               "logp_reference (summed over the response tokens, EOS included), response_tokens, prompt_truncated; "
               "a row too long to score has reward null and 'skipped' saying why.")
    parser.add_argument("--data", required=True,
                        help='rows {"prompt", "response"}: strings, or a chat prompt (a list of messages) and its '
                             "reply; .jsonl, .json, .parquet, .csv, a saved data set or a Hub name")
    add_scoring_options(parser)
    parser.set_defaults(func=_run)
