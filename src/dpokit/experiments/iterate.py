"""One round of iterative (online) DPO: sample from the current policy, label pairs with a judge, train DPO from
the current policy, evaluate on held-out prompts. `dpokit iterate` runs rounds of it (dpokit.experiments.iterate_run);
`dpokit demo` runs one, from its SFT model.

Round r starts from the policy π_{r−1} (π_0: the starting model):

1. **Sample** K continuations of every training prompt from π_{r−1}, exact samples (no top-k/top-p truncation;
   the KL estimate relies on it), and score each with the judge (plain-text prompts: prompt + continuation, as
   a review is judged whole; chat prompts: the reply; a judge that scores a continuation given its prompt, such
   as the implicit reward, gets the two apart: dpokit.judges.pointwise.judge_continuations).
2. **Label**: every two samples of a prompt whose scores differ by at least ``min_score_gap`` form a pair, the
   higher-scored chosen (``argmax``) or chosen by sampling σ(scale·Δscore) (``bradley-terry``).
3. **Train** DPO from π_{r−1} against the round's reference (the starting model, or π_{r−1}).
4. **Evaluate** π_r on held-out prompts: judge scores of its samples, KL(π_r‖π_0) per sequence from its own
   samples, and the implicit reward's accuracy on held-out pairs sampled from π_{r−1} and labelled by the judge.
   Those pairs are drawn before training and are the training run's evaluation data, so its metrics.jsonl holds
   a held-out curve (about ``HELD_OUT_EVALS`` evaluations; evaluation draws no random numbers, so the training
   itself is the same as without it).

Every random draw is seeded from the round's seed (torch's sampling: seed, +11, +12; the labels:
``random.Random(seed)``), so a round recomputed from the same inputs gives the same result.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dpokit.api import train_dpo
from dpokit.data.batching import collate
from dpokit.config import TrainConfig
from dpokit.data.records import PreferencePair, tools_of
from dpokit.errors import DpokitError
from dpokit.eval.generation import Sample, sample_ids, uses_chat_template
from dpokit.config.experiments import RoundSettings
from dpokit.judges.pointwise import POSITIVE_THRESHOLD, Judge, judge_continuations
from dpokit.models.logprobs import sequence_logprobs
from dpokit.data.prompts import Prompt
from dpokit.data.tokenize import TokenizeConfig, TokenizedExample, tokenize_examples

# offsets of a round's seed for its torch sampling streams (the starting model's held-out samples use +10)
POLICY_EVAL_SEED, HELD_OUT_PAIRS_SEED, START_EVAL_SEED = 11, 12, 10
HELD_OUT_EVALS = 6  # evaluations of the held-out pairs during a round's training (the last at its end)


def sample_continuations(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt],
                         n: int, settings: RoundSettings, seed: int) -> list[list[Sample]]:
    """`n` exact samples per prompt at the round's temperature (no top-k/top-p: the KL estimate relies on it),
    through dpokit's one sampler (the chat template is applied when the tokenizer has one)."""
    return sample_ids(model, tokenizer, prompts, max_new_tokens=settings.max_new_tokens,
                      temperature=settings.temperature, num_samples=n, seed=seed, batch_size=32 * n,
                      progress=True)


def judged_text(prompt: Prompt, text: str) -> str:
    """What a judge of whole texts scores: a plain-text prompt with its continuation (a review is judged whole),
    or the reply alone for a chat prompt."""
    return prompt + text if isinstance(prompt, str) else text


def _score(judge: Judge, prompts: Sequence[Prompt], continuations: Sequence[str]) -> list:
    """The judge's scores: given the prompt where the judge takes one apart (the implicit reward,
    dpokit.judges.pointwise.judge_continuations), else of :func:`judged_text`."""
    if hasattr(judge, "continuations"):
        return judge_continuations(judge, list(prompts), list(continuations))
    return judge([judged_text(p, c) for p, c in zip(prompts, continuations)])


def judge_scores(judge: Judge, prompts: Sequence[Prompt], continuations: Sequence[str],
                 what: Callable[[int], str] = str) -> list[float]:
    """The judge's scores of `continuations` of `prompts`, checked: one finite number each. A judge that fails
    on a text, returns something other than a number, NaN or the wrong count is a one-line DpokitError naming
    the judge and the text (`what(i)` describes text i)."""
    name = getattr(judge, "__name__", type(judge).__name__)
    shown = [judged_text(p, c)[:40] for p, c in zip(prompts, continuations)]
    try:
        scores = list(_score(judge, prompts, continuations))
    except (TypeError, ValueError) as error:  # e.g. float("abc") inside a function judge: find the text
        for i in range(len(prompts)):
            try:
                _score(judge, prompts[i : i + 1], continuations[i : i + 1])
            except (TypeError, ValueError) as single:
                raise DpokitError(f"judge {name!r} failed on text {what(i)} ({shown[i]!r}): {single}") from None
        raise DpokitError(f"judge {name!r} failed on {len(prompts)} texts: {error}") from None
    if len(scores) != len(prompts):
        raise DpokitError(f"judge {name!r} returned {len(scores)} scores for {len(prompts)} texts")
    for i, score in enumerate(scores):
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise DpokitError(f"judge {name!r} returned {score!r} for text {what(i)} ({shown[i]!r}): "
                              "scores must be finite numbers")
    return [float(s) for s in scores]


def label_pairs(prompt: Prompt, texts: list[str], scores: list[float], settings, rng: random.Random,
                source: str) -> tuple[list[PreferencePair], int]:
    """Every pair of continuations whose judge scores differ by at least `settings.min_score_gap`, as a
    preference pair (`settings`: anything with ``labeling``, ``min_score_gap`` and ``bt_scale``).

    Closer scores count as ties and give no pair: VADER's order between, say, 0.86 and 0.91 says little about
    sentiment. Returns the pairs and the number of ties.
    """
    pairs, ties = [], 0
    for i in range(len(texts)):
        for j in range(i + 1, len(texts)):
            if abs(scores[i] - scores[j]) < max(settings.min_score_gap, 1e-12) or texts[i] == texts[j]:
                ties += 1
                continue
            if settings.labeling == "argmax":
                first = scores[i] > scores[j]
            else:
                first = rng.random() < 1 / (1 + math.exp(-settings.bt_scale * (scores[i] - scores[j])))
            chosen, rejected = (texts[i], texts[j]) if first else (texts[j], texts[i])
            pairs.append(PreferencePair(prompt, chosen, rejected, f"{source} pair ({i},{j})", tools_of(prompt)))
    return pairs, ties


@dataclass
class Labelled:
    """Preference pairs from sampled continuations, with the count of ties and every judge score."""

    pairs: list[PreferencePair]
    ties: int
    scores: list[list[float]]


def sample_and_label(model, tokenizer, judge: Judge, prompts: Sequence[Prompt], settings: RoundSettings, seed: int,
                     rng: random.Random, source: str) -> Labelled:
    """K samples of each prompt from `model` (seeded `seed`), judged and labelled into pairs."""
    samples = sample_continuations(model, tokenizer, prompts, settings.samples_per_prompt, settings, seed)
    k = settings.samples_per_prompt
    flat_scores = judge_scores(judge, [p for p in prompts for _ in range(k)],
                               [x.text for group in samples for x in group],
                               lambda i: f"{i} ({source} {i // k}, sample {i % k})")
    pairs, ties, scores = [], 0, []
    for n, (prompt, group) in enumerate(zip(prompts, samples)):
        texts = [x.text for x in group]
        scores.append(flat_scores[n * k : (n + 1) * k])
        new, tied = label_pairs(prompt, texts, scores[-1], settings, rng, f"{source} {n}")
        pairs += new
        ties += tied
    return Labelled(pairs, ties, scores)


def _response(pair_prompt: Prompt, text: str):
    """A response as the data loader types it: an assistant message for a chat prompt, else the text."""
    return text if isinstance(pair_prompt, str) else [{"role": "assistant", "content": text}]


def typed_pairs(pairs: list[PreferencePair]) -> list[PreferencePair]:
    """`pairs` with the responses of chat prompts as assistant messages, as dpokit's data loader types them."""
    return [PreferencePair(p.prompt, _response(p.prompt, p.chosen), _response(p.prompt, p.rejected), p.source,
                           p.tools) for p in pairs]


def write_pairs(path: str | Path, pairs: list[PreferencePair]) -> None:
    """The pairs as prompt/chosen/rejected JSON lines (what `dpokit dpo` reads), with the prompt's tools."""
    Path(path).write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected,
                                              **({"tools": p.tools} if p.tools else {})}) + "\n" for p in pairs))


def train_round(policy: str, reference: str | None, pairs_path: str | Path, output: str | Path,
                settings: RoundSettings, seed: int, chat: bool,
                eval_pairs_path: str | Path | None = None) -> tuple[str, dict[str, float]]:
    """DPO from the model directory `policy` on the pairs in `pairs_path`, into `output` (replaced if there);
    `reference` None: the policy's starting weights are the reference. The pairs in `eval_pairs_path` (if any)
    are evaluated about ``HELD_OUT_EVALS`` times along the run, the last time at its end. Returns the trained
    model's directory and that last evaluation's metrics (empty without `eval_pairs_path`)."""
    # the round owns `output` (an interrupted round is redone from scratch); its data is made afresh every
    # round, so caching the tokenised copy would only fill the user's cache
    final_eval = train_dpo(TrainConfig(
        model=policy, ref_model=reference, overwrite=True, data_cache=False, data=str(pairs_path), output=str(output),
        beta=settings.beta, lr=settings.lr, optimizer="adamw", warmup_steps=settings.warmup_steps,
        max_steps=settings.steps, batch_size=settings.batch_size, seed=seed, max_length=settings.max_length,
        max_prompt_length=settings.max_prompt_length, precompute_ref=True, apply_chat_template=chat,
        eval_data=str(eval_pairs_path) if eval_pairs_path else None,
        eval_every=max(1, settings.steps // HELD_OUT_EVALS) if eval_pairs_path else 0))
    return str(Path(output) / "final"), final_eval


def kl_per_sequence(policy, reference, samples: Sequence[Sample]) -> list[float]:
    """log π(y|x) − log π_ref(y|x) for each y sampled from π: a Monte-Carlo estimate of the sequence KL."""
    examples = [TokenizedExample(tuple(x.prompt_ids), (tuple(x.ids),)) for x in samples if x.ids]
    kls = []
    for start in range(0, len(examples), 32):
        chunk = examples[start : start + 32]
        batch = collate(chunk, range(len(chunk)), layout="packed")
        with torch.no_grad():
            kls += (sequence_logprobs(policy, batch) - sequence_logprobs(reference, batch)).tolist()
    return kls


def score_summary(scores: list[float]) -> dict[str, float]:
    """Mean judge score, and the share above VADER's positive threshold (meaningful for the vader judge)."""
    return {"mean_score": sum(scores) / len(scores),
            "positive_share": sum(s > POSITIVE_THRESHOLD for s in scores) / len(scores)}


def held_out_samples(model, tokenizer, judge: Judge, prompts: Sequence[Prompt], settings: RoundSettings,
                     seed: int) -> tuple[list[list[Sample]], list[list[float]]]:
    """`eval_samples` samples of each held-out prompt from `model`, and their judge scores."""
    samples = sample_continuations(model, tokenizer, prompts, settings.eval_samples, settings, seed)
    k = settings.eval_samples
    flat = judge_scores(judge, [p for p in prompts for _ in range(k)], [x.text for group in samples for x in group],
                        lambda i: f"{i} (held-out prompt {i // k}, sample {i % k})")
    return samples, [flat[n * k : (n + 1) * k] for n in range(len(prompts))]


def held_out_result(pairs: list[PreferencePair], final_eval: dict[str, float], tokenizer, settings: RoundSettings,
                    chat: bool) -> dict:
    """The round's held-out figures: the training run's last evaluation (`final_eval`) of the held-out `pairs`,
    and how many of them it scored (those that tokenise; accuracy None when there are none)."""
    settings_ = TokenizeConfig(max_length=settings.max_length, max_prompt_length=settings.max_prompt_length,
                               apply_chat_template=chat)
    scored = len(tokenize_examples(typed_pairs(pairs), tokenizer, settings_)[0]) if pairs else 0
    return {"held_out_pairs": scored, "held_out_reward_accuracy": final_eval.get("rewards/accuracies") if scored
            else None, "held_out_metrics": final_eval if scored else {}}


@dataclass
class Round:
    """What one round made: its pair counts, the trained model (directory and loaded), its held-out samples
    and their judge scores, and its metrics (JSON-ready: judge scores, KL, held-out reward accuracy)."""

    pairs: int
    ties: int
    model_dir: str
    policy: PreTrainedModel
    samples: list[list[Sample]]
    scores: list[list[float]]
    metrics: dict


def run_round(policy_dir: str, reference_dir: str | None, models: dict, tokenizer, judge: Judge,
              train_prompts: Sequence[Prompt], eval_prompts: Sequence[Prompt], settings: RoundSettings, seed: int,
              pairs_path: str | Path, model_dir: str | Path, load: Callable[[str], PreTrainedModel],
              log: Callable[[str], None] = print,
              stage: Callable[[int, str], None] | None = None) -> Round:
    """One round from the policy in `policy_dir` (loaded: ``models["policy"]``), against the reference in
    `reference_dir` (None: the policy itself), with ``models["start"]`` the starting model of the whole run for
    the KL. Writes the pairs to `pairs_path` and the DPO run to `model_dir`;
    `load` loads the trained model. `stage(k, text)` announces the round's stages 1-3 (default: `log`)."""
    stage = stage or (lambda k, text: log(text))
    rng = random.Random(seed)
    chat = uses_chat_template(tokenizer, None)
    stage(1, f"sampling {settings.samples_per_prompt} continuations of {len(train_prompts)} prompts from "
             f"{policy_dir}, labelled by {getattr(judge, '__name__', 'the judge')}")
    labelled = sample_and_label(models["policy"], tokenizer, judge, train_prompts, settings, seed, rng, "prompt")
    write_pairs(pairs_path, typed_pairs(labelled.pairs))
    log(f"      {len(labelled.pairs)} pairs ({labelled.ties} ties skipped: judge scores closer than "
        f"{settings.min_score_gap} or identical text)")
    if not labelled.pairs:
        raise DpokitError(f"no preference pairs from {len(train_prompts)} prompts: every two samples tied (judge "
                          "scores closer than --min-score-gap, or identical texts); sample more, or lower the gap")
    # the held-out pairs come from the round's starting policy, as the training pairs do; drawn now, they are
    # the training run's evaluation data (a held-out curve in its metrics.jsonl)
    held_out = sample_and_label(models["policy"], tokenizer, judge, eval_prompts, settings,
                                seed + HELD_OUT_PAIRS_SEED, rng, "held-out")
    held_out_path = Path(pairs_path).with_name("held_out_" + Path(pairs_path).name)
    write_pairs(held_out_path, typed_pairs(held_out.pairs))
    stage(2, f"DPO from {policy_dir}, β={settings.beta}, {settings.steps} steps, reference "
             f"{reference_dir or 'the same model'}")
    trained, final_eval = train_round(policy_dir, reference_dir, pairs_path, model_dir, settings, seed, chat,
                                      held_out_path if held_out.pairs else None)
    policy = load(trained)
    stage(3, f"evaluating on {len(eval_prompts)} held-out prompts")
    samples, scores = held_out_samples(policy, tokenizer, judge, eval_prompts, settings, seed + POLICY_EVAL_SEED)
    kls = kl_per_sequence(policy, models["start"], [x for group in samples for x in group])
    metrics = {
        "policy": score_summary([s for group in scores for s in group]),
        "kl": {"mean": sum(kls) / len(kls), "median": sorted(kls)[len(kls) // 2], "samples": len(kls)},
        **held_out_result(held_out.pairs, final_eval, tokenizer, settings, chat),
    }
    return Round(len(labelled.pairs), labelled.ties, trained, policy, samples, scores, metrics)
