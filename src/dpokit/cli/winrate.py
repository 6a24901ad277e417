"""`dpokit winrate`: how often a model's responses beat a baseline's, by a pairwise judge, with a bootstrap
confidence interval; over several temperatures, with a plot. Its flags derive from the fields of one WinrateConfig
(dpokit.config.winrate)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dpokit.cli.options import add_options, config_from_args
from dpokit.config.winrate import WinrateConfig
from dpokit.data.validation import check_model_spec
from dpokit.errors import DataError
from dpokit.judges.pairwise import DEFAULT_TEMPLATE

EPILOG = f"""\
Each prompt's two responses are shown to the judge in an order drawn from --seed; a win counts 1, a tie 1/2.
Pointwise judges score the prompt followed by the response. Blank lines of --prompts are skipped (and counted);
an empty prompt is an error naming its line.

The llm:PATH judge's question (--judge-template FILE replaces it; {{prompt}}, {{response_a}} and {{response_b}}
are filled in, and it is sent as one user turn through the judge's chat template):

{DEFAULT_TEMPLATE}
"""


def read_winrate_prompts(path: str) -> tuple[list, list[str], int]:
    """The prompts of a --prompts file (:func:`dpokit.data.prompts.read_prompts`), where each came from
    (``FILE:LINE``), and the number of blank lines skipped. An empty prompt is an error naming its line."""
    from dpokit.data.prompts import read_prompts

    prompts = read_prompts(path, command="winrate")
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
    config: WinrateConfig = config_from_args(args)
    check_model_spec("--model", config.model)
    check_model_spec("--baseline", config.baseline)
    from dpokit.cli.vision import refuse_vision_model

    refuse_vision_model("winrate", "--model", config.model)
    refuse_vision_model("winrate", "--baseline", config.baseline)
    from dpokit.judges.pairwise import read_template

    template = read_template(config.judge_template) if config.judge_template else None
    prompts, names, blank = read_winrate_prompts(config.prompts)
    log = (lambda line: print(line, file=sys.stderr)) if config.json else print
    if blank:
        log(f"skipped {blank} blank line{'s' * (blank > 1)} of {config.prompts}")
    if config.threads is not None:
        from dpokit.runtime.threads import apply_threads

        apply_threads(config.threads, log=lambda line: print(line, file=sys.stderr))
    from dpokit.judges.loader import load_pairwise_judge
    from dpokit.judges.winrate_run import check_inputs, run_winrate

    check_inputs(config.model, config.baseline, prompts, chat_template=config.chat_template, system=config.system)
    judge = load_pairwise_judge(config.judge, template=template, both_orders=config.both_orders,
                                batch_size=config.judge_batch_size)
    several = bool(config.temperatures)
    results = run_winrate(config.model, config.baseline, prompts, judge, config.judge,
                          temperatures=config.temperature_list(), names=names, output=config.output,
                          on_judge_error=config.on_judge_error, seed=config.seed, resamples=config.resamples,
                          confidence=config.confidence, max_new_tokens=config.max_new_tokens, top_p=config.top_p,
                          batch_size=config.batch_size, chat_template=config.chat_template, system=config.system,
                          plot=several, log=log)
    for r in results:
        r["blank_lines_skipped"] = blank
    if config.json:
        print(json.dumps(results if several else results[0]))
    else:
        _print_table(results)
        if config.output:
            print(f"per-prompt records: {Path(config.output) / 'winrate.jsonl'}")


def add_command(commands) -> None:
    """Add `dpokit winrate` to the subcommands of the dpokit parser."""
    parser = commands.add_parser("winrate", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
                                 help="win rate of a model's responses against a baseline's, by a pairwise judge")
    add_options(parser, WinrateConfig, "winrate")
    parser.set_defaults(func=_run)
