"""Online (iterative) DPO on the reward–KL frontier: the methods ``dpo-online`` and ``dpo-online-gt`` of
dpokit.experiments.paper.methods.

Offline DPO learns from π_ref's pairs alone, so it can only sharpen what those samples cover; PPO keeps sampling
from its current policy. Online DPO closes that gap with the rounds of `dpokit iterate`
(dpokit.experiments.iterate), run from π_ref with the reference fixed at π_ref. For each β of
``Sizes.online_betas``, round r = 1 … ``Sizes.online_rounds``:

1. **sample** ``demo.completions`` continuations of every training prompt from π_{r−1} (π_0 = π_ref), exact samples
   at the demo's temperature and length;
2. **label** them into pairs (the demo's labelling: argmax, ties closer than its ``min_score_gap`` dropped) with
   the judge of the variant: ``learned`` (``dpo-online``) the reward model PPO uses, fitted once per task on the
   sweep's pairs and shared with PPO and Best-of-N (dpokit.experiments.paper.methods.learned_reward);
   ``ground-truth`` (``dpo-online-gt``) the task's judge itself (VADER), as PPO-GT is rewarded;
3. **train** DPO from π_{r−1} for ``Sizes.online_steps`` steps with offline DPO's optimizer settings (AdamW at
   ``dpo_lr``, its batch size, lengths 128/16, the reference's log-probs precomputed), against π_ref;
4. **measure** π_r as every point is measured (dpokit.experiments.paper.task.measure): one point per round and β,
   knob ``{"beta": β, "round": r}``.

Round r is seeded with ``round_seed(seed, r)`` (dpokit.config.experiments), as `dpokit iterate`'s rounds are: its
sampling, labelling and training. Round 1 therefore draws exactly the samples of π_ref that made the sweep's pairs
(same model, prompts, settings and seed), so round 1 of ``dpo-online-gt`` is offline DPO on the sweep's own pairs,
for ``online_steps`` steps; the rounds after it are what being online adds.

**Sample budget** (dpokit.experiments.paper.task.cost), cumulative up to and including each round, with
n = (training prompts) × ``demo.completions`` samples drawn per round:

* ``samples_drawn`` = r·n: the policies' samples drawn for training so far;
* ``dpo-online-gt``: ``judge_calls`` = r·n (every sample is labelled by the ground truth), no reward-model calls;
* ``dpo-online``: ``judge_calls`` = ``task.pair_samples`` (the ground-truth labels the reward model was fitted on,
  as for PPO) and ``reward_model_calls`` = r·n (the samples it labelled).

Each round writes ``<output>/<method>/beta-<β>/round-<r>/``: ``pairs.jsonl`` and the DPO run in ``model/``; the
run's checkpoints are deleted once the round is measured (their optimizer state is twice the model), its
``final/`` (the policy the next round starts from) is kept.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import replace

from dpokit.config.experiments import RoundSettings, round_seed
from dpokit.errors import ConfigError, DpokitError
from dpokit.experiments.iterate import sample_and_label, train_round, typed_pairs, write_pairs
from dpokit.experiments.iterate_run import round_dir
from dpokit.experiments.paper.task import Sizes, Task, cost, measure
from dpokit.judges.pointwise import Judge

# the kind of labels -> the method its points carry
METHODS = {"learned": "dpo-online", "ground-truth": "dpo-online-gt"}


def online_settings(sizes: Sizes, beta: float) -> RoundSettings:
    """A round's settings at `beta`: the demo's sampling and labelling (its completions per prompt, length,
    temperature, labelling rule), and offline DPO's optimizer settings (dpokit.experiments.paper.methods.dpo_points)
    for ``online_steps`` steps."""
    return replace(sizes.demo.round_settings(), beta=beta, lr=sizes.dpo_lr, batch_size=sizes.batch_size,
                   steps=sizes.online_steps, warmup_steps=min(10, sizes.online_steps // 4), max_length=128,
                   max_prompt_length=16)


def online_cost(task: Task, labels: str, samples_drawn: int) -> dict:
    """The budget of a point after `samples_drawn` samples in all (its round's and every earlier round's): the
    ground truth labels them all (``ground-truth``), or the reward model does, fitted on ``task.pair_samples``
    ground-truth labels (``learned``)."""
    if labels == "ground-truth":
        return cost(samples_drawn, samples_drawn)
    return cost(samples_drawn, task.pair_samples, samples_drawn)


def dpo_online_points(task: Task, labels: str) -> list[dict]:
    """Online DPO at every β of ``task.sizes.online_betas``: ``online_rounds`` rounds each from π_ref, pairs
    labelled by the learned reward model (`labels` ``"learned"``: method ``dpo-online``) or by the judge
    (``"ground-truth"``: ``dpo-online-gt``); a point per round and β, in that order."""
    if labels not in METHODS:
        raise ConfigError(f"online DPO labels must be one of {', '.join(map(repr, METHODS))}; got {labels!r}")
    if labels == "learned":
        from dpokit.experiments.paper.methods import learned_reward

        judge = learned_reward(task)
    else:
        judge = task.judge
    points = []
    for beta in task.sizes.online_betas:
        points += beta_rounds(task, labels, judge, beta)
    return points


def beta_rounds(task: Task, labels: str, judge: Judge, beta: float) -> list[dict]:
    """The rounds at one β, each starting from the previous round's policy (the first from π_ref), the
    reference π_ref throughout; a measured point per round."""
    from dpokit.api import load_model
    from dpokit.eval.generation import uses_chat_template
    from dpokit.experiments.paper.baselines import checkpoint_dirs

    method, sizes = METHODS[labels], task.sizes
    settings = online_settings(sizes, beta)
    chat = uses_chat_template(task.tokenizer, None)
    per_round = len(task.train_prompts) * settings.samples_per_prompt
    policy_dir, policy, points = task.sft_dir, task.reference, []
    for number in range(1, sizes.online_rounds + 1):
        directory = round_dir(task.out / method / f"beta-{beta:g}", number)
        directory.mkdir(parents=True, exist_ok=True)
        seed = round_seed(sizes.demo.seed, number)
        labelled = sample_and_label(policy, task.tokenizer, judge, task.train_prompts, settings, seed,
                                    random.Random(seed), "prompt")
        if not labelled.pairs:
            raise DpokitError(f"{method} β={beta:g} round {number}: no preference pairs from "
                              f"{len(task.train_prompts)} prompts (every two samples tied under "
                              f"{getattr(judge, '__name__', 'the judge')}); sample more completions per prompt")
        write_pairs(directory / "pairs.jsonl", typed_pairs(labelled.pairs))
        reference = None if policy_dir == task.sft_dir else task.sft_dir  # None: the policy itself, i.e. π_ref
        # task.threads needs no passing on: prepare_task applied it, and a count given holds for the process
        policy_dir, _ = train_round(policy_dir, reference, directory / "pairs.jsonl", directory / "model",
                                    settings, seed, chat)
        policy = load_model(policy_dir)
        point = measure(task, policy, method, {"beta": beta, "round": number},
                        online_cost(task, labels, number * per_round), model=policy_dir)
        for _, checkpoint in checkpoint_dirs(directory / "model"):
            shutil.rmtree(checkpoint)
        points.append(point)
        task.log(f"      {method} β={beta:g} round {number}/{sizes.online_rounds}: {len(labelled.pairs)} pairs "
                 f"({labelled.ties} ties), reward {point['reward']:.3f}, KL {point['kl']:.2f}, "
                 f"{point['samples_drawn']} samples drawn")
    return points

