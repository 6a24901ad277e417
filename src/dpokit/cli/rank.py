"""`dpokit rank`: best-of-N with the implicit reward; each prompt's candidate responses ordered by β·log π/π_ref.

The reward's prompt-only term β·log Z(x) is the same for every candidate of a prompt, so this order is the one
the DPO policy's own reward model gives (dpokit.eval.scoring).
"""

from __future__ import annotations

import argparse

from dpokit.cli.options import add_options
from dpokit.cli.score import given_tools, run_scoring
from dpokit.config.eval import RankConfig


def ranked_row(index: int, row, results) -> dict:
    """The output row of one prompt: its candidates from the highest implicit reward to the lowest (skipped ones
    last) and the best one."""
    from dpokit.eval.scoring import ranking

    order = ranking(results)
    ranked = [{"response_index": j, "response": row.given_responses[j], **results[j].row()} for j in order]
    best = order[0] if results[order[0]].reward is not None else None
    return {"index": index, "prompt": row.given_prompt, **given_tools(row),
            "best": None if best is None else row.given_responses[best],
            "best_index": best, "best_reward": None if best is None else results[best].reward,
            "ranking": ranked}


def _ranked_rows(rows, results) -> list[dict]:
    out, start = [], 0
    for i, row in enumerate(rows):
        out.append(ranked_row(i, row, results[start : start + len(row.responses)]))
        start += len(row.responses)
    return out


def _run(args: argparse.Namespace) -> None:
    from dpokit.data.responses import read_candidates

    run_scoring(args, read_candidates, _ranked_rows)


def add_command(commands) -> None:
    """Add `dpokit rank` to the subcommands of the dpokit parser."""
    parser = commands.add_parser(
        "rank",
        help="best-of-N with the implicit reward: each prompt's responses ordered by β·log π(y|x)/π_ref(y|x)",
        epilog="Writes one JSON line per input row, in order: index, prompt, best (the response with the highest "
               "implicit reward), best_index, best_reward, and ranking: every response, best first, with its "
               "response_index, reward, logp_policy, logp_reference, response_tokens and prompt_truncated (a "
               "response too long to score comes last, with reward null and 'skipped' saying why). A row's 'tools' "
               "(tool schemas) are rendered with its conversation by the chat template, as in training, and "
               "written back after the prompt.")
    add_options(parser, RankConfig, "rank")
    parser.set_defaults(func=_run)
