"""Preference losses on per-sequence log-probabilities: which formula a LossConfig selects, and its inputs.

:func:`preference_loss` takes per-sequence log-probs SUMMED over the scored response tokens (shape ``[n]``,
one entry per preference pair) and the token counts, builds the quantities each loss is defined on (log-ratios,
margins, length-averaged log-probs), and applies the formula of ``config.loss_type`` from
:mod:`dpokit.losses.formulas` (where every formula and its paper are documented). No model, no batching, no
reduction: the caller reduces (e.g. a mean over the global batch).

Which log-probs each loss uses:

* summed, against the reference: ``sigmoid``, ``robust``, ``hinge``, ``exo_pair`` (margin ``h``),
  ``nca_pair``, ``bco_pair``, ``sppo_hard``, ``apo_zero``, ``apo_down`` (each response's log-ratio) and ``dpop``
  (both);
* length-averaged, against the reference: ``ipo``, ``sigmoid_norm``;
* length-averaged, no reference: ``simpo``, ``orpo``.

``kto`` is not a pair loss: it is trained on unpaired examples (a completion labelled desirable or not), see
:func:`unpaired_loss`.

Several losses with a reference can be mixed: ``loss_type="sigmoid,bco_pair"`` with ``loss_weights=(0.8, 0.2)``
gives ``0.8*sigmoid + 0.2*bco_pair`` per pair (TRL's weighted sum of batch means is the batch mean of this).

All arithmetic is done in float32 whatever the input dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from dpokit.losses import formulas as lf
from dpokit.config.loss import (LOSS_TYPES, REFERENCE_FREE_LOSSES, UNPAIRED_LOSSES,  # noqa: F401  (re-exported)
                                LossConfig)

# loss_type -> formula of the margin h (summed or, for ipo/sigmoid_norm, length-averaged log-probs).
_MARGIN_LOSSES: dict[str, Callable[[Tensor, LossConfig], Tensor]] = {
    "sigmoid": lambda h, c: lf.sigmoid_loss(h, c.beta, c.label_smoothing),
    "robust": lambda h, c: lf.robust_loss(h, c.beta, c.label_smoothing),
    "hinge": lambda h, c: lf.hinge_loss(h, c.beta),
    "exo_pair": lambda h, c: lf.exo_pair_loss(h, c.beta, c.label_smoothing),
    "ipo": lambda h, c: lf.ipo_loss(h, c.beta),
    "sigmoid_norm": lambda h, c: lf.sigmoid_norm_loss(h, c.beta),
}
_AVERAGED_MARGIN = ("ipo", "sigmoid_norm")
# loss_type -> formula of the two responses' (summed) log-ratios.
_RATIO_LOSSES: dict[str, Callable[[Tensor, Tensor, float], Tensor]] = {
    "nca_pair": lf.nca_pair_loss,
    "bco_pair": lf.bco_pair_loss,
    "sppo_hard": lf.sppo_hard_loss,
    "apo_zero": lf.apo_zero_loss,
    "apo_down": lf.apo_down_loss,
}
# Losses that need the token counts (length averaging); the sft term needs the chosen count too.
LENGTH_AVERAGED_LOSSES = _AVERAGED_MARGIN + REFERENCE_FREE_LOSSES


@dataclass
class PreferenceLossOutput:
    """Per-pair results of :func:`preference_loss` (all shape ``[n]``, float32)."""

    losses: Tensor  # per-pair loss, including the sft term when sft_weight > 0
    chosen_rewards: Tensor  # the implicit reward of the chosen response, detached (see preference_loss)
    rejected_rewards: Tensor  # the same for the rejected response


def _check_1d(name: str, t: Tensor, n: int | None) -> int:
    if t.dim() != 1 or (n is not None and t.shape[0] != n):
        want = "[n]" if n is None else f"[{n}]"
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    return t.shape[0]


def _counts(name: str, counts: Tensor | None, n: int, why: str) -> Tensor:
    if counts is None:
        raise ValueError(f"{why} needs {name}")
    _check_1d(name, counts, n)
    return counts.float()


def _with_reference(name: str, config: LossConfig, chosen_ratio: Tensor, rejected_ratio: Tensor,
                    cc: Tensor | None, cr: Tensor | None) -> Tensor:
    """Per-pair loss `name` (a loss with a reference) from the two responses' log-ratios."""
    if name in _RATIO_LOSSES:
        return _RATIO_LOSSES[name](chosen_ratio, rejected_ratio, config.beta)
    if name == "dpop":
        return lf.dpop_loss(chosen_ratio - rejected_ratio, chosen_ratio, config.beta, config.dpop_penalty)
    if name in _AVERAGED_MARGIN:
        return _MARGIN_LOSSES[name](chosen_ratio / cc - rejected_ratio / cr, config)
    return _MARGIN_LOSSES[name](chosen_ratio - rejected_ratio, config)


def preference_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    reference_chosen: Tensor | None,
    reference_rejected: Tensor | None,
    config: LossConfig,
    *,
    chosen_token_counts: Tensor | None = None,
    rejected_token_counts: Tensor | None = None,
    pair_weights: Tensor | None = None,
) -> PreferenceLossOutput:
    """Per-pair preference loss and implicit rewards (formulas: :mod:`dpokit.losses.formulas`).

    Args:
        policy_chosen, policy_rejected: policy log-probs summed over response tokens, ``[n]``.
        reference_chosen, reference_rejected: same for the frozen reference model; may be None
            only when ``config.reference_free`` (and are ignored then).
        config: the loss to compute.
        chosen_token_counts, rejected_token_counts: number of scored response tokens per
            sequence, ``[n]``, every entry >= 1 (not checked, to avoid a device sync). Both are
            required for the losses in ``LENGTH_AVERAGED_LOSSES``; ``chosen_token_counts`` is required
            when ``sft_weight > 0``.
        pair_weights: ``[n]`` factors of each pair's preference loss (WPO's weights; the sft term is not
            weighted), required when ``config.use_weighting``; treated as constants (detached).

    Returns:
        :class:`PreferenceLossOutput` with unreduced ``[n]`` float32 tensors. Rewards are
        ``beta * (policy - reference)`` on the summed log-probs (reference 0 when reference-free), also for
        ``ipo`` and ``sigmoid_norm`` (as TRL's DPOTrainer logs them); for ``simpo`` and ``orpo`` they are
        ``beta * mean per-token log-prob`` (as TRL's CPOTrainer and ORPOTrainer log them).
    """
    if config.unpaired:
        raise ValueError("loss 'kto' is defined on unpaired examples: use unpaired_loss")
    n = _check_1d("policy_chosen", policy_chosen, None)
    _check_1d("policy_rejected", policy_rejected, n)
    pc, pr = policy_chosen.float(), policy_rejected.float()
    loss, beta = config.loss_type, config.beta
    cc = cr = None
    if set(config.loss_types) & set(LENGTH_AVERAGED_LOSSES):
        cc = _counts("chosen_token_counts", chosen_token_counts, n, f"loss_type {loss!r}")
        cr = _counts("rejected_token_counts", rejected_token_counts, n, f"loss_type {loss!r}")

    if loss in REFERENCE_FREE_LOSSES:
        chosen_avg, rejected_avg = pc / cc, pr / cr
        if loss == "simpo":
            losses = lf.simpo_loss(chosen_avg, rejected_avg, beta, config.gamma, config.label_smoothing)
        else:
            losses = lf.orpo_loss(chosen_avg, rejected_avg, beta)
        chosen_rewards, rejected_rewards = beta * chosen_avg, beta * rejected_avg
    else:
        if config.reference_free:
            chosen_ratio, rejected_ratio = pc, pr
        else:
            if reference_chosen is None or reference_rejected is None:
                raise ValueError("reference log-probs are required unless config.reference_free")
            _check_1d("reference_chosen", reference_chosen, n)
            _check_1d("reference_rejected", reference_rejected, n)
            chosen_ratio, rejected_ratio = pc - reference_chosen.float(), pr - reference_rejected.float()
        losses = sum(weight * _with_reference(name, config, chosen_ratio, rejected_ratio, cc, cr)
                     for name, weight in zip(config.loss_types, config.weights))
        chosen_rewards, rejected_rewards = beta * chosen_ratio, beta * rejected_ratio

    if config.use_weighting:
        if pair_weights is None:
            raise ValueError("use_weighting needs pair_weights")
        _check_1d("pair_weights", pair_weights, n)
        losses = losses * pair_weights.detach().float()
    if config.sft_weight > 0:
        counts = _counts("chosen_token_counts", chosen_token_counts, n, "sft_weight > 0")
        losses = losses + config.sft_weight * (-pc / counts)

    return PreferenceLossOutput(losses, chosen_rewards.detach(), rejected_rewards.detach())


def sft_loss(logps: Tensor, token_counts: Tensor) -> Tensor:
    """Per-sequence SUM of token negative log-likelihoods, i.e. ``-logps`` (float32, ``[n]``).

    This is deliberately not divided by ``token_counts``: to get the usual per-token mean over a
    (possibly sharded / accumulated) global batch, the caller sums these values and divides by
    the total number of tokens, ``token_counts.sum()`` over the global batch. ``token_counts`` is
    taken only to check that the shapes agree.
    """
    n = _check_1d("logps", logps, None)
    _check_1d("token_counts", token_counts, n)
    return -logps.float()


def unlikelihood_loss(chosen_token_logps: Tensor, rejected_token_logps: Tensor, alpha: float = 1.0) -> Tensor:
    """The DPO paper's Unlikelihood baseline (§6; Welleck et al. 2019) on one batch of pairs: the SUM over tokens
    ``-sum log p(chosen token) - alpha * sum log(1 - p(rejected token))`` (float32 scalar).

    Takes the policy's log-prob of every response token (flat ``[T]`` tensors, the chosen responses' tokens and
    the rejected ones'): the likelihood of the preferred responses goes up and, token by token, the probability of
    the dispreferred ones goes down. Not divided by anything: the caller divides by its token count, as for
    :func:`sft_loss`. ``1 - p`` is floored at 1e-5 (:func:`dpokit.losses.formulas.unlikelihood_token_loss`).
    """
    _check_1d("chosen_token_logps", chosen_token_logps, None)
    _check_1d("rejected_token_logps", rejected_token_logps, None)
    return -chosen_token_logps.float().sum() + alpha * lf.unlikelihood_token_loss(rejected_token_logps.float()).sum()


def preference_metrics(
    out: PreferenceLossOutput, policy_chosen: Tensor, policy_rejected: Tensor
) -> dict[str, Tensor]:
    """Detached per-pair ``[n]`` metrics (not reduced, so the caller can reduce globally).

    ``rewards/accuracies`` is ``(chosen_reward > rejected_reward)``: ties count as wrong, as in
    the reference implementation.
    """
    chosen, rejected = out.chosen_rewards.detach(), out.rejected_rewards.detach()
    return {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        "rewards/accuracies": (chosen > rejected).float(),
        "logps/chosen": policy_chosen.detach().float(),
        "logps/rejected": policy_rejected.detach().float(),
        "loss": out.losses.detach(),
    }


@dataclass
class UnpairedLossOutput:
    """Per-example results of :func:`unpaired_loss` (``[n]`` float32, except the scalar ``kl``)."""

    losses: Tensor  # per-example loss, weighted by --desirable-weight / --undesirable-weight
    rewards: Tensor  # beta * (policy - reference), detached
    kl: Tensor  # the reference point z0 the losses used: a detached scalar >= 0


def unpaired_loss(
    policy: Tensor,
    reference: Tensor,
    policy_kl: Tensor,
    reference_kl: Tensor,
    desirable: Tensor,
    config: LossConfig,
) -> UnpairedLossOutput:
    """KTO's per-example loss (formula: :func:`dpokit.losses.formulas.kto_loss`) on unpaired examples.

    Args:
        policy, reference: log-probs of each example's completion given its prompt, summed over its tokens, ``[n]``.
        policy_kl, reference_kl: the same for the mismatched (prompt, completion) pairs the KL term is estimated
            from, ``[m]`` (TRL pairs each prompt with the previous example's completion in the batch).
        desirable: ``[n]`` bool labels (True: desirable).
        config: a LossConfig with ``loss_type == "kto"``.

    Returns:
        :class:`UnpairedLossOutput`; rewards are ``beta * (policy - reference)``, as TRL's KTOTrainer logs them.
    """
    if not config.unpaired:
        raise ValueError(f"unpaired_loss needs loss_type 'kto', got {config.loss_type!r}")
    n = _check_1d("policy", policy, None)
    _check_1d("reference", reference, n)
    _check_1d("desirable", desirable, n)
    m = _check_1d("policy_kl", policy_kl, None)
    _check_1d("reference_kl", reference_kl, m)
    logratio = policy.float() - reference.float()
    kl = lf.kto_kl_estimate(policy_kl.float() - reference_kl.float())
    losses = lf.kto_loss(logratio, desirable.bool(), kl, config.beta, *config.kto_weights)
    return UnpairedLossOutput(losses, (config.beta * logratio).detach(), kl)
