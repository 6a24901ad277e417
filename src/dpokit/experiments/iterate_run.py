"""`dpokit iterate`: rounds of iterative (online) DPO from a starting policy (dpokit.experiments.iterate runs each round).

The output directory holds::

    iterate_config.json      the run's settings (a resumed run must share them, the number of rounds aside)
    round-000/               the starting model's held-out evaluation (eval_samples.jsonl, metrics.json)
    round-001/pairs.jsonl    round 1's preference pairs, sampled from the starting model
    round-001/held_out_pairs.jsonl  its held-out pairs (the same policy; evaluated along the round's DPO run)
    round-001/model/         round 1's DPO run (model/final: the policy round 2 starts from)
    round-001/eval_samples.jsonl, metrics.json
    ...
    summary.json             every complete round's metrics; judge_scores.png: judge score and KL per round

A round is complete when its ``COMPLETE`` marker exists: it is written last, atomically, after everything else
of the round. ``--resume`` keeps the complete rounds, deletes an incomplete one and carries on from there (and
past the old ``--rounds`` if a larger one is given); every round is seeded from its number, so a recomputed round
gives what it would have given without the interruption.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from dpokit.errors import ConfigError
from dpokit.config.experiments import IterateConfig, round_seed
from dpokit.judges.pointwise import Judge
from dpokit.judges.loader import load_judge
from dpokit.data.prompts import Prompt, read_prompts
from dpokit.runtime.files import write_atomic
from dpokit.train.rundir import claim_output

MARKER = "COMPLETE"
CONFIG_FILE = "iterate_config.json"


def iterate_contents(output: Path) -> list[str]:
    """What of an earlier `dpokit iterate` run `output` holds (names, sorted)."""
    if not output.is_dir():
        return []
    return sorted(p.name for p in output.iterdir()
                  if p.name.startswith("round-") or p.name in (CONFIG_FILE, "summary.json", "judge_scores.png"))


def round_dir(output: Path, number: int) -> Path:
    """The directory of round `number` (0: the starting model's evaluation)."""
    return output / f"round-{number:03d}"


def is_complete(directory: Path) -> bool:
    """Whether a round's directory holds a whole round (its marker is written last)."""
    return (directory / MARKER).is_file()


def split_prompts(config: IterateConfig) -> tuple[list[Prompt], list[Prompt]]:
    """The training and held-out prompts: --eval-prompts, else --eval-fraction of --prompts (seeded)."""
    prompts = read_prompts(config.prompts, command="iterate")
    if config.eval_prompts is not None:
        return prompts, read_prompts(config.eval_prompts, command="iterate")
    from dpokit.data import split_eval

    return split_eval(prompts, config.eval_fraction, config.seed)


def _check_same_run(output: Path, config: IterateConfig) -> None:
    """A resumed run continues only a run with the same settings (more or fewer rounds are fine)."""
    path = output / CONFIG_FILE
    if not path.is_file():
        return
    before = json.loads(path.read_text())
    now = json.loads(json.dumps(config.run_identity()))
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if changed:
        was = ", ".join(f"--{k.replace('_', '-')} {before.get(k)!r}" for k in changed)
        raise ConfigError(f"{output} holds a run with other settings (it had {was}); --resume continues only the "
                          "same run: give the same options, or --overwrite")


def _write_eval_samples(path: Path, prompts, samples, scores) -> None:
    path.write_text("".join(json.dumps({"prompt": p, "completions": [x.text for x in group], "scores": s,
                                        **({"tools": p.tools} if getattr(p, "tools", None) else {})},
                                       ensure_ascii=False) + "\n" for p, group, s in zip(prompts, samples, scores)))


def _finish_round(directory: Path, metrics: dict) -> None:
    write_atomic(directory / "metrics.json", json.dumps(metrics, indent=1))
    write_atomic(directory / MARKER, json.dumps({"round": metrics["round"]}) + "\n")  # last: the round is whole


def _score_metrics(summary: dict, vader: bool) -> dict:
    return summary if vader else {"mean_score": summary["mean_score"]}  # the VADER threshold means nothing else


def run_iterate(config: IterateConfig, log: Callable[[str], None] = print, judge: Judge | None = None) -> dict:
    """Run `config.rounds` rounds of iterative DPO into `config.output` (resumed with `config.resume`); return
    the summary (also written to summary.json). `judge` (a callable ``list[str] -> list[float]``) replaces
    ``config.judge``; a resumed run must be given the same one."""
    output = Path(config.output)
    train_prompts, eval_prompts = split_prompts(config)
    overlap = len(set(map(json.dumps, train_prompts)) & set(map(json.dumps, eval_prompts)))
    if overlap:
        log(f"note: {overlap} held-out prompts are also training prompts")
    judge = judge or load_judge(config.judge)
    from dpokit.experiments.reviews import base_model_path

    start = config.model or base_model_path()
    with claim_output(output, resume=config.resume, overwrite=config.overwrite, contents=iterate_contents):
        if config.resume:
            _check_same_run(output, config)
        write_atomic(output / CONFIG_FILE, json.dumps(config.run_identity(), indent=1))
        return _rounds(config, output, start, train_prompts, eval_prompts, judge, log)


def _rounds(config: IterateConfig, output: Path, start: str, train_prompts, eval_prompts, judge: Judge,
            log: Callable[[str], None]) -> dict:
    from dpokit.experiments.iterate import START_EVAL_SEED, held_out_samples, run_round, score_summary
    from dpokit.models.loading import load_model, load_tokenizer
    from dpokit.experiments.report import plot_rounds
    from dpokit.runtime.threads import apply_threads, config_width

    settings = config.round_settings()
    vader = getattr(judge, "__name__", "") == "vader"  # the positive share means something for VADER only
    tokenizer = load_tokenizer(start)
    apply_threads(config.threads or None, width=config_width(start), log=log)
    start_model = load_model(start)
    log(f"{len(train_prompts)} training prompts, {len(eval_prompts)} held-out prompts; starting policy {start}")
    rounds: list[dict] = []
    zero = round_dir(output, 0)
    if is_complete(zero):
        rounds.append(json.loads((zero / "metrics.json").read_text()))
    else:
        shutil.rmtree(zero, ignore_errors=True)
        zero.mkdir(parents=True)
        log("round 0: evaluating the starting policy")
        samples, scores = held_out_samples(start_model, tokenizer, judge, eval_prompts, settings,
                                           config.seed + START_EVAL_SEED)
        _write_eval_samples(zero / "eval_samples.jsonl", eval_prompts, samples, scores)
        rounds.append({"round": 0, "model": start, "judge": _score_metrics(
            score_summary([s for g in scores for s in g]), vader), "kl_vs_start": {"mean": 0.0}})
        _finish_round(zero, rounds[-1])
    policy_dir, policy = start, start_model
    for number in range(1, config.rounds + 1):
        directory = round_dir(output, number)
        if is_complete(directory):
            rounds.append(json.loads((directory / "metrics.json").read_text()))
            # from the directory, not the path recorded (the run may have been moved); loaded when needed
            policy_dir, policy = str(directory / "model" / "final"), None
            log(f"round {number}: complete, kept ({policy_dir})")
            continue
        shutil.rmtree(directory, ignore_errors=True)  # an interrupted round is redone from scratch
        directory.mkdir(parents=True)
        policy = policy if policy is not None else load_model(policy_dir)
        fixed = config.reference == "fixed"
        # None: the round's starting policy is its reference (always so in round 1)
        reference_dir = start if fixed and policy_dir != start else None
        models = {"policy": policy, "start": start_model}
        seed = round_seed(config.seed, number)
        one = run_round(policy_dir, reference_dir, models, tokenizer, judge, train_prompts, eval_prompts, settings,
                        seed, directory / "pairs.jsonl", directory / "model", load_model, log=log,
                        stage=lambda k, text, n=number: log(f"round {n} [{k}/3] {text}"))
        _write_eval_samples(directory / "eval_samples.jsonl", eval_prompts, one.samples, one.scores)
        m = one.metrics
        rounds.append({"round": number, "model": one.model_dir, "started_from": policy_dir,
                       "reference": reference_dir or policy_dir, "seed": seed,
                       "train_prompts": len(train_prompts), "pairs": one.pairs, "ties": one.ties,
                       "judge": _score_metrics(m["policy"], vader), "kl_vs_start": m["kl"],
                       "held_out_pairs": m["held_out_pairs"], "held_out_reward_accuracy": m["held_out_reward_accuracy"],
                       "held_out_metrics": m["held_out_metrics"]})
        _finish_round(directory, rounds[-1])
        log(format_round(rounds[-1]))
        policy_dir, policy = one.model_dir, one.policy
    summary = {"config": asdict(config), "start": start, "rounds": rounds}
    write_atomic(output / "summary.json", json.dumps(summary, indent=1))
    plot_rounds(output / "judge_scores.png", rounds)
    log(format_summary(summary))
    return summary


def _accuracy(metrics: dict) -> str:
    accuracy = metrics["held_out_reward_accuracy"]
    return "-" if accuracy is None else f"{accuracy:.3f}"  # None: every held-out pair tied


def format_round(metrics: dict) -> str:
    """One line for a finished round."""
    judge = metrics["judge"]
    share = f", {judge['positive_share']:.1%} positive" if "positive_share" in judge else ""
    return (f"round {metrics['round']}: mean judge score {judge['mean_score']:.3f}{share}, "
            f"KL vs start {metrics['kl_vs_start']['mean']:.2f} nats, {metrics['pairs']} pairs, held-out "
            f"implicit-reward accuracy {_accuracy(metrics)} on {metrics['held_out_pairs']} pairs")


def format_summary(summary: dict) -> str:
    """The run as a table: one row per round (0: the starting policy)."""
    vader = "positive_share" in summary["rounds"][0]["judge"]
    lines = ["", f"{'round':>5s}{'judge score':>13s}" + (f"{'positive':>10s}" if vader else "")
             + f"{'KL vs start':>13s}{'pairs':>7s}{'held-out acc':>14s}"]
    for r in summary["rounds"]:
        row = f"{r['round']:>5d}{r['judge']['mean_score']:>13.3f}"
        row += f"{r['judge']['positive_share']:>10.1%}" if vader else ""
        row += f"{r['kl_vs_start']['mean']:>13.2f}"
        row += f"{r['pairs']:>7d}{_accuracy(r):>14s}" if r["round"] else f"{'-':>7s}{'-':>14s}"
        lines.append(row)
    return "\n".join(lines)
