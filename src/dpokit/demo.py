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
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dpokit.api import load_model, load_tokenizer, make_accelerator, train_dpo, train_sft
from dpokit.batching import collate
from dpokit.config import TrainConfig
from dpokit.data.records import PreferencePair
from dpokit.demo_config import DemoConfig  # noqa: F401  (re-exported: dpokit.demo.DemoConfig)
from dpokit.judges import POSITIVE_THRESHOLD, load_judge
from dpokit.logprobs import sequence_logprobs
from dpokit.losses import LossConfig
from dpokit.engine import Scorer
from dpokit.generation import Sample, sample_ids
from dpokit.objective import DPOObjective
from dpokit.reference import ModelReference
from dpokit.report import plot_report
from dpokit.reviews import base_model_path, generate_reviews, review_prefixes
from dpokit.threads import apply_threads, config_width
from dpokit.tokenize import TokenizeConfig, TokenizedExample, tokenize_examples
from dpokit.trainer import evaluate as evaluate_objective


def sample_continuations(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], n: int,
                         config: DemoConfig, seed: int) -> list[list[Sample]]:
    """`n` continuations per prompt, sampled at the demo's temperature with no top-k/top-p truncation, so that
    they are exact samples of the model (the KL estimate relies on it). dpokit's one sampler: a model with a chat
    template would get it here as in `dpokit generate`; the embedded model has none, so prompts go as raw text."""
    return sample_ids(model, tokenizer, prompts, max_new_tokens=config.max_new_tokens,
                      temperature=config.temperature, num_samples=n, seed=seed, batch_size=32 * n,
                      progress=True)


def label_pairs(prompt: str, texts: list[str], scores: list[float], config: DemoConfig, rng: random.Random,
                source: str) -> tuple[list[PreferencePair], int]:
    """Every pair of continuations whose judge scores differ by at least `min_score_gap`, as a preference pair.

    Closer scores count as ties and give no pair: VADER's order between, say, 0.86 and 0.91 says little about
    sentiment. Returns the pairs and the number of ties.
    """
    pairs, ties = [], 0
    for i in range(len(texts)):
        for j in range(i + 1, len(texts)):
            if abs(scores[i] - scores[j]) < max(config.min_score_gap, 1e-12) or texts[i] == texts[j]:
                ties += 1
                continue
            if config.labeling == "argmax":
                first = scores[i] > scores[j]
            else:
                first = rng.random() < 1 / (1 + math.exp(-config.bt_scale * (scores[i] - scores[j])))
            chosen, rejected = (texts[i], texts[j]) if first else (texts[j], texts[i])
            pairs.append(PreferencePair(prompt, chosen, rejected, f"{source} pair ({i},{j})"))
    return pairs, ties


def _kl_per_sequence(policy, reference, samples) -> list[float]:
    """log π(y|x) − log π_ref(y|x) for each y sampled from π: a Monte-Carlo estimate of the sequence KL."""
    examples = [TokenizedExample(tuple(x.prompt_ids), (tuple(x.ids),)) for x in samples if x.ids]
    kls = []
    for start in range(0, len(examples), 32):
        chunk = examples[start : start + 32]
        batch = collate(chunk, range(len(chunk)), layout="packed")
        with torch.no_grad():
            kls += (sequence_logprobs(policy, batch) - sequence_logprobs(reference, batch)).tolist()
    return kls


def _summary(scores: list[float]) -> dict[str, float]:
    return {"mean_score": sum(scores) / len(scores),
            "positive_share": sum(s > POSITIVE_THRESHOLD for s in scores) / len(scores)}


def run_demo(config: DemoConfig, log: Callable[[str], None] = print) -> dict:
    """Run the whole demo; write report.json and plots to `config.output`; return the report."""
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    judge = load_judge(config.judge)
    base = config.model or base_model_path()
    tokenizer = load_tokenizer(base)
    # chosen once for every stage (all of them run this model's width); --threads holds for all of them
    apply_threads(config.threads or None, width=config_width(base), log=log)
    rng = random.Random(config.seed)

    log(f"[1/4] SFT of {base} on {config.sft_reviews} generated reviews")
    reviews = generate_reviews(config.sft_reviews, seed=config.seed + 1)
    (out / "sft.jsonl").write_text("".join(json.dumps({"prompt": "", "completion": " " + r.strip()}) + "\n"
                                           for r in reviews))
    # the demo owns its output directory: a re-run replaces its stages (overwrite); its data is made afresh on
    # every run, so caching the tokenised copy would only fill the user's cache
    train_sft(TrainConfig(model=base, data=str(out / "sft.jsonl"), output=str(out / "sft"), lr=config.sft_lr,
                          overwrite=True, data_cache=False, optimizer="adamw", warmup_steps=5, max_steps=config.sft_steps,
                          batch_size=config.batch_size, seed=config.seed, max_length=256, max_prompt_length=8))
    sft_dir = str(out / "sft" / "final")
    reference = load_model(sft_dir)

    log(f"[2/4] sampling {config.completions} continuations of {config.prompts} prompts, labelled by {config.judge}")
    train_prompts = review_prefixes(config.prompts, config.seed + 2, tokenizer)
    seen = set(train_prompts)  # held-out prompts: distinct, and never used in training
    candidates = review_prefixes(config.eval_prompts * 4, config.seed + 3, tokenizer)
    held_out = list(dict.fromkeys(p for p in candidates if p not in seen))[: config.eval_prompts]
    pairs, ties = [], 0
    samples = sample_continuations(reference, tokenizer, train_prompts, config.completions, config, config.seed)
    for k, (prompt, group) in enumerate(zip(train_prompts, samples)):
        texts = [x.text for x in group]
        scores = judge([prompt + t for t in texts])
        new, tied = label_pairs(prompt, texts, scores, config, rng, f"prompt {k}")
        pairs += new
        ties += tied
    (out / "pairs.jsonl").write_text("".join(
        json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n" for p in pairs))
    log(f"      {len(pairs)} pairs ({ties} ties skipped: judge scores closer than {config.min_score_gap} "
        "or identical text)")

    log(f"[3/4] DPO from the SFT model, β={config.beta}, {config.dpo_steps} steps")
    train_dpo(TrainConfig(model=sft_dir, overwrite=True, data_cache=False,
                          data=str(out / "pairs.jsonl"), output=str(out / "dpo"), beta=config.beta,
                          lr=config.lr, optimizer="adamw", warmup_steps=10, max_steps=config.dpo_steps,
                          batch_size=config.batch_size, seed=config.seed, max_length=128, max_prompt_length=16,
                          precompute_ref=True))
    policy = load_model(str(out / "dpo" / "final"))

    log(f"[4/4] evaluating on {len(held_out)} held-out prompts")
    report = _evaluate(policy, reference, tokenizer, judge, held_out, config, rng)
    report.update({"config": asdict(config), "train_pairs": len(pairs), "train_ties": ties,
                   "train_prompts": train_prompts})
    (out / "report.json").write_text(json.dumps(report, indent=1))
    plot_report(out, report)
    log(format_report(report))
    return report


def _evaluate(policy, reference, tokenizer, judge, prompts, config, rng) -> dict:
    sft_samples = sample_continuations(reference, tokenizer, prompts, config.eval_samples, config, config.seed + 10)
    dpo_samples = sample_continuations(policy, tokenizer, prompts, config.eval_samples, config, config.seed + 11)
    rows, sft_scores, dpo_scores = [], [], []
    for prompt, sft_group, dpo_group in zip(prompts, sft_samples, dpo_samples):
        s = judge([prompt + x.text for x in sft_group])
        d = judge([prompt + x.text for x in dpo_group])
        sft_scores += s
        dpo_scores += d
        rows.append({"prompt": prompt, "sft": [x.text for x in sft_group], "sft_scores": s,
                     "dpo": [x.text for x in dpo_group], "dpo_scores": d})
    kls = _kl_per_sequence(policy, reference, [x for group in dpo_samples for x in group])

    # Held-out preference pairs, labelled like the training pairs, from fresh reference samples.
    pair_samples = sample_continuations(reference, tokenizer, prompts, config.completions, config, config.seed + 12)
    pairs = []
    for k, (prompt, group) in enumerate(zip(prompts, pair_samples)):
        texts = [x.text for x in group]
        pairs += label_pairs(prompt, texts, judge([prompt + t for t in texts]), config, rng, f"held-out {k}")[0]
    examples = tokenize_examples(pairs, tokenizer, TokenizeConfig(max_length=128, max_prompt_length=16))[0]
    objective = DPOObjective(LossConfig(beta=config.beta), ModelReference(reference))
    eval_config = TrainConfig(model="-", data="-", output="-", batch_size=32)
    metrics = evaluate_objective(Scorer(policy), objective, examples, eval_config, make_accelerator(eval_config),
                                 tokenizer.pad_token_id)
    return {
        "sft": _summary(sft_scores), "dpo": _summary(dpo_scores),
        "kl": {"mean": sum(kls) / len(kls), "median": sorted(kls)[len(kls) // 2], "samples": len(kls)},
        "held_out_pairs": len(examples), "held_out_reward_accuracy": metrics["rewards/accuracies"],
        "held_out_metrics": metrics, "prompts": rows,
        "sft_scores": sft_scores, "dpo_scores": dpo_scores,
    }


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
        "",
        "held-out examples (SFT → DPO):",
    ]
    for row in report["prompts"][: report["config"]["examples_shown"]]:
        lines.append(f"  {row['prompt']!r}")
        lines.append(f"    SFT [{row['sft_scores'][0]:+.2f}] {row['sft'][0].strip()}")
        lines.append(f"    DPO [{row['dpo_scores'][0]:+.2f}] {row['dpo'][0].strip()}")
    return "\n".join(lines)
