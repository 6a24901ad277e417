"""`dpokit score`: the implicit reward β·(log π(y|x) − log π_ref(y|x)) of every (prompt, response) of a file, or
with a reward model as --model (`dpokit reward`'s output) its score r(x, y). Its flags are the fields of ScoreConfig
(dpokit.config.eval).

Also the options, scoring and output writing that `dpokit rank` shares (dpokit.cli.rank).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from dpokit.cli.options import add_options, config_from_args
from dpokit.config.eval import ScoreConfig, ScoringOptions


def check_inputs(config: ScoringOptions) -> None:
    """What can be checked before anything is loaded (the option values were checked by the config itself)."""
    from dpokit.data.validation import check_eval_inputs
    from dpokit.errors import ConfigError

    check_eval_inputs(config)
    if config.output != "-" and Path(config.output).is_dir():
        raise ConfigError(f"--output {config.output}: a directory; give a file name")


def logger(config: ScoringOptions):
    """Where progress lines go: standard error when the scores go to standard output, else standard output."""
    stream = sys.stderr if config.output == "-" else sys.stdout
    return lambda line: print(line, file=stream, flush=True)


def row_tools(rows) -> list:
    """The tool schemas of every response of `rows` (its row's, None for none), flattened in order: the chat
    template renders them with the conversation, as training renders a row's tools column."""
    return [row.tools for row in rows for _ in row.responses]


def given_tools(row) -> dict:
    """``{"tools": [...]}`` for an output row whose input row had tools, else nothing: the output says what was
    scored, and rows without tools are written as before."""
    return {"tools": row.tools} if row.tools else {}


def score_rows(config: ScoringOptions, rows, log) -> list:
    """The ImplicitReward of every response of `rows` (dpokit.data.responses.ResponseRow), flattened in order; the
    ModelReward (dpokit.eval.reward_scoring) when --model is a reward model."""
    from dpokit.eval.scoring import default_device, fit_settings, implicit_rewards, load_pair
    from dpokit.runtime.threads import apply_threads, model_width

    settings = fit_settings(config.model, config, log=log)
    device = default_device()
    if config.reward_model:
        return _reward_model_rows(config, rows, settings, device, log)
    policy, reference, tokenizer = load_pair(config.model, config.ref_model, dtype=config.dtype, device=device,
                                             attention=config.attention)
    apply_threads(config.threads, width=model_width(policy), device=device, log=log)
    prompts = [row.prompt for row in rows for _ in row.responses]
    responses = [r for row in rows for r in row.responses]
    sources = [s for row in rows for s in row.response_sources()]
    results = implicit_rewards(policy, reference, tokenizer, prompts, responses, config.beta, settings=settings,
                               batch_size=config.batch_size, sources=sources, tools=row_tools(rows), progress=True)
    skipped = [s for s, r in zip(sources, results) if r.skipped is not None]
    truncated = sum(r.prompt_truncated for r in results)
    log(f"scored {len(results) - len(skipped)} of {len(results)} responses (β={config.beta})"
        + (f"; prompt truncated in {truncated}" if truncated else "")
        + (f"; skipped {len(skipped)}, written with reward null ({settings.max_length} tokens are not enough even "
           f"after prompt truncation; e.g. {', '.join(skipped[:3])})" if skipped else ""))
    return results


def _reward_model_rows(config: ScoringOptions, rows, settings, device, log) -> list:
    """The ModelReward of every response of `rows` under the reward model --model (no reference, no β)."""
    from dpokit.eval.reward_scoring import load_reward_scorer, model_rewards
    from dpokit.runtime.threads import apply_threads, model_width

    model, tokenizer = load_reward_scorer(config.model, dtype=config.dtype, device=device, attention=config.attention)
    apply_threads(config.threads, width=model_width(model), device=device, log=log)
    sources = [s for row in rows for s in row.response_sources()]
    results = model_rewards(model, tokenizer, [row.prompt for row in rows for _ in row.responses],
                            [r for row in rows for r in row.responses], settings=settings,
                            batch_size=config.batch_size, sources=sources, tools=row_tools(rows), progress=True)
    skipped = [s for s, r in zip(sources, results) if r.skipped is not None]
    log(f"scored {len(results) - len(skipped)} of {len(results)} responses with the reward model {config.model}"
        + (f"; skipped {len(skipped)}, written with reward null (e.g. {', '.join(skipped[:3])})" if skipped else ""))
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


def run_scoring(args: argparse.Namespace, read: Callable[..., list],
                output_rows: Callable[[list, list], Iterable[dict]]) -> None:
    """The body of `dpokit score` and `dpokit rank`: check the options, read --data with `read`
    (dpokit.data.responses), score every response and write the rows `output_rows(rows, results)` makes."""
    from dpokit.cli.vision import refuse_vision_model

    config = config_from_args(args)
    check_inputs(config)
    refuse_vision_model(args.command, "--model", config.model, gguf_file=getattr(config, "gguf_file", None))
    refuse_vision_model(args.command, "--ref-model", config.ref_model)
    log = logger(config)
    rows = read(config.data, split=config.split)
    results = score_rows(config, rows, log)
    write_jsonl(config.output, output_rows(rows, results))
    if config.output != "-":
        log(f"wrote {config.output}")


def _scored_rows(rows, results) -> Iterable[dict]:
    return ({"index": i, "prompt": row.given_prompt, **given_tools(row), "response": row.given_responses[0],
             **result.row()} for i, (row, result) in enumerate(zip(rows, results)))


def _run(args: argparse.Namespace) -> None:
    from dpokit.data.responses import read_responses

    run_scoring(args, read_responses, _scored_rows)


def add_command(commands) -> None:
    """Add `dpokit score` to the subcommands of the dpokit parser."""
    parser = commands.add_parser(
        "score",
        help="the implicit reward β·log π(y|x)/π_ref(y|x) of responses (a DPO policy as a reward model), or a "
             "reward model's score",
        epilog="Writes one JSON line per input row, in order: index, prompt, response, reward, logp_policy, "
               "logp_reference (summed over the response tokens, EOS included), response_tokens, prompt_truncated; "
               "a row too long to score has reward null and 'skipped' saying why. With a reward model as --model "
               "(no --ref-model): index, prompt, response, reward, response_tokens, prompt_truncated. A row's 'tools' "
               "(tool schemas) are rendered with its conversation by the chat template, as in training, and "
               "written back after the prompt.")
    add_options(parser, ScoreConfig, "score")
    parser.set_defaults(func=_run)
