"""What one training step computes: DPO (policy and reference log-probs -> preference loss), SFT (NLL), KTO, the
paper's Unlikelihood baseline (token log-probs of both responses), or a reward model's Bradley–Terry loss (rewards of
both responses).

An objective returns the *sum* of its per-item losses over a micro-batch and says what that sum is to be
divided by (pairs for DPO, tokens for SFT). The trainer adds the divisors of every micro-batch of a step,
across processes, before dividing: that is what makes gradient accumulation and data parallelism give the
same update as one large batch, even for token-averaged SFT where micro-batches hold different token counts.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch
from torch import Tensor, nn

from dpokit.data.batching import Batch, shared_length_weights
from dpokit.losses.dispatch import (LossConfig, preference_loss, preference_metrics, unlikelihood_loss,
                           unpaired_loss)
from dpokit.data.tokenize import TokenizedExample
from dpokit.losses.formulas import bradley_terry_loss

Reference = Callable[[Batch, nn.Module], Tensor]  # (batch, the engine-wrapped policy) -> log-probs


class Objective(Protocol):
    """What the trainer needs of an objective: a loss sum per batch and what to divide it by."""

    num_responses: int

    def divisor(self, batch: Batch) -> int:
        """The count the batch's loss sum is a sum over (pairs, tokens)."""

    def __call__(self, scorer: nn.Module, batch: Batch) -> "StepResult":
        """Loss and metric sums on `batch` of the policy whose log-probs `scorer(batch)` returns."""


@dataclass
class StepResult:
    """A micro-batch's summed loss (with grad) and summed metrics (detached); both share one divisor, except the
    metrics named in `metric_counts`, whose sums are divided by the sum of their own counts (KTO's rewards of the
    desirable examples are a mean over the desirable examples)."""

    loss_sum: Tensor
    metric_sums: dict[str, Tensor]
    metric_counts: dict[str, Tensor] = field(default_factory=dict)


class DPOObjective:
    """The DPO family of losses on (chosen, rejected) pairs against a reference.

    With ``loss.ld_alpha`` the reference must score the batch it is given (a model, not a precomputed table): the
    batch carries LD-DPO's token weights to both.
    """

    num_responses = 2

    def __init__(self, loss: LossConfig, reference: Reference | None, *, average_logps: bool = False) -> None:
        if reference is None and not loss.reference_free:
            raise ValueError("a reference is required unless the loss is reference-free")
        self.loss = loss
        self.reference = reference
        self.average_logps = average_logps

    def divisor(self, batch: Batch) -> int:
        """Pairs in the batch: the DPO loss is a mean over pairs."""
        return batch.num_sequences // 2

    def __call__(self, scorer: nn.Module, batch: Batch) -> StepResult:
        """Loss and metric sums on `batch` of the policy whose log-probs `scorer(batch)` returns."""
        if self.loss.ld_alpha is not None:  # LD-DPO: policy and reference score the same weighted tokens
            batch = replace(batch, target_weights=shared_length_weights(batch, self.loss.ld_alpha))
        policy = scorer(batch)
        pair_weights = None
        if self.loss.use_weighting:  # WPO: the policy's probability weights of both responses, no gradients
            with torch.no_grad():
                weights = torch.exp(scorer(batch, alignment=True).float())
            pair_weights = weights[0::2] * weights[1::2]
        reference = None
        if not self.loss.reference_free:
            with torch.no_grad():
                reference = self.reference(batch, scorer).float()
        counts = batch.token_counts.to(policy.device).float()
        if self.average_logps:
            policy = policy / counts
            reference = None if reference is None else reference / counts
            counts = torch.ones_like(counts)  # already per token: ipo and the sft term must not divide again
        ref_c, ref_r = (None, None) if reference is None else (reference[0::2], reference[1::2])
        out = preference_loss(
            policy[0::2], policy[1::2], ref_c, ref_r, self.loss,
            chosen_token_counts=counts[0::2], rejected_token_counts=counts[1::2], pair_weights=pair_weights,
        )
        metrics = preference_metrics(out, policy[0::2].detach(), policy[1::2].detach())
        return StepResult(out.losses.sum(), {k: v.detach().float().sum() for k, v in metrics.items()})


class SFTObjective:
    """Maximum likelihood of the responses: mean negative log-likelihood per response token."""

    num_responses = 1

    def divisor(self, batch: Batch) -> int:
        """Response tokens in the batch: SFT's loss is a mean over tokens."""
        return int(batch.token_counts.sum())

    def __call__(self, scorer: nn.Module, batch: Batch) -> StepResult:
        """Loss and metric sums on `batch` of the policy whose log-probs `scorer(batch)` returns."""
        nll = -scorer(batch).sum()
        return StepResult(nll, {"loss": nll.detach()})


def kl_pairs(examples: Sequence[TokenizedExample]) -> list[TokenizedExample]:
    """Each unpaired example ``(x_i, (y_i,))`` as ``(x_i, (y_i, y_{i-1}))``: its completion, then the completion of
    the previous example of the batch (cyclically: the first takes the last one's), as TRL's KTOTrainer builds the
    mismatched pairs ``(x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1})`` its KL term is estimated from."""
    n = len(examples)
    return [TokenizedExample(e.prompt_ids, (e.responses[0], examples[i - 1].responses[0]), e.source)
            for i, e in enumerate(examples)] if n else []


class KTOObjective:
    """KTO (``--loss kto``) on unpaired examples: each one's completion and a mismatched completion for the KL term.

    The trainer hands it whole micro-batches built by :meth:`pair_examples` (sequence ``2i`` is example i's own
    completion, ``2i + 1`` the mismatched one), so that the KL estimate is a mean over the micro-batch, as TRL's
    per-device batch. Labels are looked up by example id in `labels` (``[examples]`` bool, of the data set the
    batches come from). Metrics: loss, ``rewards/chosen`` and ``logps/chosen`` (means over the desirable examples),
    ``rewards/rejected`` and ``logps/rejected`` (over the undesirable ones) and ``kl`` (the KL estimate z0).
    """

    num_responses = 2
    metric_names = ("loss", "kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected")

    def __init__(self, loss: LossConfig, reference: Reference, labels: Tensor) -> None:
        if not loss.unpaired:
            raise ValueError(f"KTOObjective needs loss 'kto', got {loss.loss_type!r}")
        self.loss = loss
        self.reference = reference
        self.labels = labels.bool()

    @staticmethod
    def pair_examples(examples: Sequence[TokenizedExample]) -> list[TokenizedExample]:
        """The micro-batch's examples with their KL completions (:func:`kl_pairs`)."""
        return kl_pairs(examples)

    def divisor(self, batch: Batch) -> int:
        """Examples in the batch: the loss is a mean over examples."""
        return batch.num_sequences // 2

    def __call__(self, scorer: nn.Module, batch: Batch) -> StepResult:
        """Loss and metric sums on `batch` of the policy whose log-probs `scorer(batch)` returns."""
        policy = scorer(batch)
        with torch.no_grad():
            reference = self.reference(batch, scorer).float()
        desirable = self.labels.index_select(0, batch.example_ids.to(self.labels.device)).to(policy.device)
        out = unpaired_loss(policy[0::2], reference[0::2], policy[1::2], reference[1::2], desirable, self.loss)
        logps = policy[0::2].detach().float()
        d = desirable.float()
        u = 1.0 - d
        n = torch.tensor(float(len(d)), device=policy.device)
        metrics = {"loss": out.losses.detach().sum(), "kl": out.kl * n,
                   "rewards/chosen": (out.rewards * d).sum(), "rewards/rejected": (out.rewards * u).sum(),
                   "logps/chosen": (logps * d).sum(), "logps/rejected": (logps * u).sum()}
        counts = {"rewards/chosen": d.sum(), "rewards/rejected": u.sum(), "logps/chosen": d.sum(),
                  "logps/rejected": u.sum()}
        return StepResult(out.losses.sum(), metrics, counts)


class UnlikelihoodObjective:
    """The DPO paper's Unlikelihood baseline on (chosen, rejected) pairs (dpokit.losses.dispatch.unlikelihood_loss): the
    chosen response's likelihood up, each rejected token's probability down; no reference. The loss is a mean
    over all response tokens of the batch, chosen and rejected."""

    num_responses = 2
    # the trainer's evaluation sums these (the two terms of the loss, each per token of the batch)
    metric_names = ("loss", "loss/chosen_nll", "loss/rejected_unlikelihood")

    def __init__(self, alpha: float = 1.0) -> None:
        self.alpha = alpha

    def divisor(self, batch: Batch) -> int:
        """Response tokens of both responses: the loss is a mean over tokens."""
        return int(batch.token_counts.sum())

    def __call__(self, scorer: nn.Module, batch: Batch) -> StepResult:
        """Loss and metric sums on `batch` of the policy whose token log-probs `scorer(batch, tokens=True)` gives."""
        logps = scorer(batch, tokens=True)
        chosen = batch.target_seq % 2 == 0  # sequences alternate chosen, rejected (as DPOObjective reads them)
        nll = unlikelihood_loss(logps[chosen], logps.new_zeros(0))
        loss = unlikelihood_loss(logps[chosen], logps[~chosen], self.alpha)
        return StepResult(loss, {"loss": loss.detach(), "loss/chosen_nll": nll.detach(),
                                 "loss/rejected_unlikelihood": (loss - nll).detach()})


class RewardObjective:
    """A reward model's Bradley–Terry loss on (chosen, rejected) pairs (dpokit.losses.formulas.bradley_terry_loss):
    `scorer(batch)` gives the reward of every sequence (a reward model's Scorer: dpokit.models.rewards). `margins`
    (``[examples]`` float, by example id in the data set the batches come from) are TRL's per-pair margin column;
    `center_coefficient` TRL's ``center_rewards_coefficient``. The loss is a mean over pairs; ``accuracy`` is the
    share of pairs whose chosen response gets the higher reward, ``margin`` the mean of r_w − r_l."""

    num_responses = 2
    metric_names = ("loss", "accuracy", "margin", "rewards/chosen", "rewards/rejected")

    def __init__(self, margins: Tensor | None = None, center_coefficient: float | None = None) -> None:
        self.margins = margins
        self.center_coefficient = center_coefficient

    def divisor(self, batch: Batch) -> int:
        """Pairs in the batch: the loss is a mean over pairs."""
        return batch.num_sequences // 2

    def __call__(self, scorer: nn.Module, batch: Batch) -> StepResult:
        """Loss and metric sums on `batch` of the reward model whose rewards `scorer(batch)` returns."""
        rewards = scorer(batch).float()
        chosen, rejected = rewards[0::2], rewards[1::2]
        margin = None
        if self.margins is not None:
            margin = self.margins.index_select(0, batch.example_ids.to(self.margins.device)).to(rewards.device)
        losses = bradley_terry_loss(chosen, rejected, margin, self.center_coefficient)
        c, r = chosen.detach(), rejected.detach()
        metrics = {"loss": losses.detach().sum(), "accuracy": (c > r).float().sum(), "margin": (c - r).sum(),
                   "rewards/chosen": c.sum(), "rewards/rejected": r.sum()}
        return StepResult(losses.sum(), metrics)
