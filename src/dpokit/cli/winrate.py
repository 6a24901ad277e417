"""`dpokit winrate`: how often a model's responses beat a baseline's, by a pairwise judge, with a bootstrap
confidence interval; over several temperatures, with a plot."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dpokit.errors import ConfigError, DataError
from dpokit.data.validation import check_model_spec
from dpokit.judges.pairwise import DEFAULT_TEMPLATE

JUDGE_HELP = ("pairwise judge: llm:PATH (a local instruction-tuned LM asked which response is better, read from "
              "its next-token probabilities of 'A' and 'B'), or a pointwise judge made pairwise (higher score wins, "
              "equal scores tie): vader, module.path:function, classifier:PATH:LABEL, reward:PATH, "
              "implicit:POLICY:REF[:BETA]")
EPILOG = f"""\
Each prompt's two responses are shown to the judge in an order drawn from --seed; a win counts 1, a tie 1/2.
Pointwise judges score the prompt followed by the response. Blank lines of --prompts are skipped (and counted);
an empty prompt is an error naming its line.

The llm:PATH judge's question (--judge-template FILE replaces it; {{prompt}}, {{response_a}} and {{response_b}}
are filled in, and it is sent as one user turn through the judge's chat template):

{DEFAULT_TEMPLATE}
"""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the option help, and the epilog (the template) as written."""


def parse_temperatures(text: str) -> list[float]:
    """``0.25,0.5,1`` as a list of temperatures (each >= 0, no repeats)."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--temperatures must be comma-separated numbers, got {text!r}") from None
    if not values or any(v < 0 for v in values) or len(set(values)) != len(values):
        raise ConfigError(f"--temperatures needs distinct numbers >= 0, got {text!r}")
    return values


def read_winrate_prompts(path: str) -> tuple[list, list[str], int]:
    """The prompts of a --prompts file (:func:`dpokit.data.prompts.read_prompts`), where each came from
    (``FILE:LINE``), and the number of blank lines skipped. An empty prompt is an error naming its line."""
    from dpokit.data.prompts import read_prompts

    prompts = read_prompts(path)
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    numbers = [n for n, line in enumerate(lines, start=1) if line.strip()]  # read_prompts: one per such line
    names = [f"{path}:{n}" for n in numbers]
    for prompt, where in zip(prompts, names):
        contents = [prompt] if isinstance(prompt, str) else [str(m.get("content", "")) for m in prompt]
        if not any(c.strip() for c in contents):
            raise DataError(f"{where}: empty prompt")
    return prompts, names, len(lines) - len(numbers)


def _print_table(results: list[dict]) -> None:
    print(f"{'temperature':>11}  {'win rate':>8}  {'CI':>15}  {'wins':>5} {'losses':>6} {'ties':>5} {'n':>5}"
          f" {'skipped':>7}")
    for r in results:
        ci = f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
        print(f"{r['temperature']:>11g}  {r['win_rate']:>8.3f}  {ci:>15}  {r['wins']:>5} {r['losses']:>6} "
              f"{r['ties']:>5} {r['n']:>5} {r['skipped']:>7}")


def _run(args: argparse.Namespace) -> None:
    check_model_spec("--model", args.model)
    check_model_spec("--baseline", args.baseline)
    temperatures = parse_temperatures(args.temperatures) if args.temperatures else [args.temperature]
    if args.temperatures and not args.output:
        raise ConfigError("--temperatures draws a plot: give --output DIR")
    if (args.temperature < 0 or not 0 < args.top_p <= 1 or min(args.max_new_tokens, args.batch_size,
                                                                 args.judge_batch_size, args.resamples) < 1
            or not 0 < args.confidence < 1):
        raise ConfigError("need --temperature >= 0, 0 < --top-p <= 1, 0 < --confidence < 1, and --max-new-tokens, "
                          "--batch-size, --judge-batch-size and --resamples >= 1")
    from dpokit.judges.pairwise import read_template

    template = read_template(args.judge_template) if args.judge_template else None
    prompts, names, blank = read_winrate_prompts(args.prompts)
    log = (lambda line: print(line, file=sys.stderr)) if args.json else print
    if blank:
        log(f"skipped {blank} blank line{'s' * (blank > 1)} of {args.prompts}")
    if args.threads is not None:
        from dpokit.runtime.threads import apply_threads

        apply_threads(args.threads, log=lambda line: print(line, file=sys.stderr))
    from dpokit.judges.loader import load_pairwise_judge
    from dpokit.judges.winrate_run import check_inputs, run_winrate

    check_inputs(args.model, args.baseline, prompts, chat_template=args.chat_template, system=args.system)
    judge = load_pairwise_judge(args.judge, template=template, both_orders=args.both_orders,
                                batch_size=args.judge_batch_size)
    results = run_winrate(args.model, args.baseline, prompts, judge, args.judge, temperatures=temperatures,
                          names=names, output=args.output, on_judge_error=args.on_judge_error, seed=args.seed,
                          resamples=args.resamples, confidence=args.confidence, max_new_tokens=args.max_new_tokens,
                          top_p=args.top_p, batch_size=args.batch_size, chat_template=args.chat_template,
                          system=args.system, plot=bool(args.temperatures), log=log)
    for r in results:
        r["blank_lines_skipped"] = blank
    if args.json:
        print(json.dumps(results if args.temperatures else results[0]))
    else:
        _print_table(results)
        if args.output:
            print(f"per-prompt records: {Path(args.output) / 'winrate.jsonl'}")


def add_command(commands) -> None:
    """Add `dpokit winrate` to the subcommands of the dpokit parser."""
    parser = commands.add_parser("winrate", formatter_class=_Formatter, epilog=EPILOG,
                                 help="win rate of a model's responses against a baseline's, by a pairwise judge")
    parser.add_argument("--model", required=True, help="the model compared: model or LoRA adapter directory, or hub "
                                                       "name")
    parser.add_argument("--baseline", required=True, help="the model it is compared with (same tokenizer)")
    parser.add_argument("--prompts", required=True, metavar="FILE",
                        help="prompts, as dpokit generate reads them (FILE.jsonl: JSON strings, message lists or "
                             "{\"prompt\"|\"messages\": ...} objects; any other file: one plain-text prompt per line)")
    parser.add_argument("--judge", required=True, help=JUDGE_HELP)
    temperature = parser.add_mutually_exclusive_group()
    temperature.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0 = greedy)")
    temperature.add_argument("--temperatures", metavar="T1,T2,...",
                             help="several temperatures (e.g. 0.25,0.5,0.75,1.0): a win rate at each, and a plot "
                                  "winrate.png in --output")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (a list of them with --temperatures) and nothing else on stdout")
    parser.add_argument("--output", metavar="DIR", help="write winrate.jsonl (per-prompt records) and winrate.png here")
    parser.add_argument("--judge-template", metavar="FILE",
                        help="the llm: judge's question, with {prompt}, {response_a}, {response_b} (default below)")
    parser.add_argument("--both-orders", action=argparse.BooleanOptionalAction, default=True,
                        help="ask the llm: judge with the responses in both orders and average (cancels a "
                             "judge's position bias; twice the judge's work)")
    parser.add_argument("--on-judge-error", default="stop", choices=("stop", "skip"),
                        help="a prompt the judge fails on (error or NaN): stop, naming the prompts, or leave it out "
                             "(counted as skipped)")
    parser.add_argument("--system", help="a system message put before each prompt that has none (chat models)")
    parser.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None,
                        help="render prompts with the models' chat template (default: when they have one)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens per response")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts sampled together")
    parser.add_argument("--judge-batch-size", type=int, default=8, help="pairs the llm: judge reads together")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples of the confidence interval")
    parser.add_argument("--confidence", type=float, default=0.95, help="confidence level of the interval")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the sampling (the baseline's: seed + 1), the order shown and the bootstrap")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: chosen from the model's width and "
                                                    "the free CPUs)")
    parser.set_defaults(func=_run)
