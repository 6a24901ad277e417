"""`dpokit demo`: the paper's controlled-sentiment experiment (§6.1), end to end on the embedded model.

x is the 2–8-token opening of a movie review; the policy should continue it positively. The pipeline:

1. SFT of the shipped base model on generated reviews (the paper's SFT step); the result is π_ref.
2. For each of P training prompts, sample K continuations from π_ref and score prompt + continuation with
   the judge; every pair of the K with different scores becomes a preference pair, the higher-scored one
   chosen (``--labeling argmax``), or chosen by sampling a Bradley–Terry model of the judge scores
   (``--labeling bradley-terry``, P(i ≻ j) = σ(scale·(s_i − s_j))). K = 4 gives up to 6 pairs per prompt;
   pairs whose scores differ by less than ``--min-score-gap`` are ties and give none (counted).
3. DPO from π_ref.
4. Evaluation on held-out prompts never used in training: judge scores and share of positive
   continuations of π_ref and π_θ, KL(π_θ‖π_ref) per sequence estimated from π_θ's own samples, and the
   implicit reward's accuracy on held-out pairs labelled by the judge.

Steps 2-4 are one round of iterative DPO (dpokit.experiments.iterate.run_round, what `dpokit iterate` repeats) from the
SFT model, the SFT model also its reference.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from dpokit.api import load_model, load_tokenizer, train_sft
from dpokit.config import TrainConfig
from dpokit.config.experiments import DemoConfig  # noqa: F401  (re-exported: dpokit.experiments.demo.DemoConfig)
from dpokit.experiments.iterate import START_EVAL_SEED, held_out_samples, label_pairs, run_round, score_summary  # noqa: F401
from dpokit.judges.loader import load_judge
from dpokit.experiments.report import plot_report
from dpokit.experiments.reviews import base_model_path, generate_reviews, review_prefixes
from dpokit.runtime.threads import apply_threads, config_width


def train_reference(config: DemoConfig, out: Path) -> str:
    """The demo's SFT step: fine-tune the base model (`config.model` or the embedded one) on `config.sft_reviews`
    generated reviews (written to OUT/sft.jsonl) into OUT/sft; returns the directory of the result, π_ref."""
    reviews = generate_reviews(config.sft_reviews, seed=config.seed + 1)
    (out / "sft.jsonl").write_text("".join(json.dumps({"prompt": "", "completion": " " + r.strip()}) + "\n"
                                           for r in reviews))
    # the demo owns its output directory: a re-run replaces its stages (overwrite); its data is made afresh on
    # every run, so caching the tokenised copy would only fill the user's cache
    train_sft(TrainConfig(model=config.model or base_model_path(), data=str(out / "sft.jsonl"),
                          output=str(out / "sft"), lr=config.sft_lr, overwrite=True, data_cache=False,
                          optimizer="adamw", warmup_steps=5, max_steps=config.sft_steps, batch_size=config.batch_size,
                          seed=config.seed, max_length=256, max_prompt_length=8))
    return str(out / "sft" / "final")


def run_demo(config: DemoConfig, log: Callable[[str], None] = print) -> dict:
    """Run the whole demo (SFT, then one round of dpokit.experiments.iterate from the SFT model); write report.json and plots
    to `config.output`; return the report."""
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    judge = load_judge(config.judge)
    base = config.model or base_model_path()
    tokenizer = load_tokenizer(base)
    # chosen once for every stage (all of them run this model's width); --threads holds for all of them
    apply_threads(config.threads or None, width=config_width(base), log=log)

    log(f"[1/4] SFT of {base} on {config.sft_reviews} generated reviews")
    sft_dir = train_reference(config, out)
    reference = load_model(sft_dir)

    train_prompts = review_prefixes(config.prompts, config.seed + 2, tokenizer)
    seen = set(train_prompts)  # held-out prompts: distinct, and never used in training
    candidates = review_prefixes(config.eval_prompts * 4, config.seed + 3, tokenizer)
    held_out = list(dict.fromkeys(p for p in candidates if p not in seen))[: config.eval_prompts]
    # steps 2-4 are one round of iterative DPO from the SFT model (dpokit.experiments.iterate), the reference its start
    titles = {1: f"sampling {config.completions} continuations of {config.prompts} prompts, labelled by {config.judge}",
              2: f"DPO from the SFT model, β={config.beta}, {config.dpo_steps} steps",
              3: f"evaluating on {len(held_out)} held-out prompts"}
    settings = config.round_settings()
    one = run_round(sft_dir, None, {"policy": reference, "start": reference}, tokenizer,
                    judge, train_prompts, held_out, settings, config.seed, out / "pairs.jsonl", out / "dpo",
                    load_model, log=log, stage=lambda k, _: log(f"[{k + 1}/4] {titles[k]}"))
    sft_samples, sft_scores = held_out_samples(reference, tokenizer, judge, held_out, settings,
                                               config.seed + START_EVAL_SEED)
    rows = [{"prompt": prompt, "sft": [x.text for x in s], "sft_scores": s_scores,
             "dpo": [x.text for x in d], "dpo_scores": d_scores}
            for prompt, s, s_scores, d, d_scores in zip(held_out, sft_samples, sft_scores, one.samples, one.scores)]
    sft_flat = [s for group in sft_scores for s in group]
    dpo_flat = [s for group in one.scores for s in group]
    metrics = one.metrics
    report = {"sft": score_summary(sft_flat), "dpo": metrics["policy"], "kl": metrics["kl"],
              "held_out_pairs": metrics["held_out_pairs"],
              "held_out_reward_accuracy": metrics["held_out_reward_accuracy"],
              "held_out_metrics": metrics["held_out_metrics"], "prompts": rows,
              "sft_scores": sft_flat, "dpo_scores": dpo_flat,
              "config": asdict(config), "train_pairs": one.pairs, "train_ties": one.ties,
              "train_prompts": train_prompts}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    plot_report(out, report)
    log(format_report(report))
    return report


def format_report(report: dict) -> str:
    """The demo's result as a few readable lines, with side-by-side examples."""
    sft, dpo = report["sft"], report["dpo"]
    lines = [
        "",
        f"{'':28s}{'SFT (π_ref)':>14s}{'DPO (π_θ)':>14s}",
        f"{'mean judge score':28s}{sft['mean_score']:>14.3f}{dpo['mean_score']:>14.3f}",
        f"{'positive continuations':28s}{sft['positive_share']:>14.1%}{dpo['positive_share']:>14.1%}",
        f"KL(π_θ‖π_ref) per sequence: {report['kl']['mean']:.2f} nats (mean of {report['kl']['samples']} samples)",
        f"held-out implicit-reward accuracy: {report['held_out_reward_accuracy']:.3f} "
        f"on {report['held_out_pairs']} pairs",
        f"reward-KL frontier point (β {report['config']['beta']:g}): reward {dpo['mean_score']:.3f} at KL "
        f"{report['kl']['mean']:.2f}; the frontier of DPO, PPO and the baselines: dpokit reproduce sentiment",
        "",
        "held-out examples (SFT → DPO):",
    ]
    for row in report["prompts"][: report["config"]["examples_shown"]]:
        lines.append(f"  {row['prompt']!r}")
        lines.append(f"    SFT [{row['sft_scores'][0]:+.2f}] {row['sft'][0].strip()}")
        lines.append(f"    DPO [{row['dpo_scores'][0]:+.2f}] {row['dpo'][0].strip()}")
    return "\n".join(lines)
