"""Preference losses as pure functions of per-sequence log-probabilities.

Every function here takes per-sequence log-probs that are SUMMED over the scored response
tokens (shape ``[n]``, one entry per preference pair) and returns per-pair tensors; no model,
no batching, no reduction. The caller reduces (e.g. a mean over the global batch).

With ``h = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)``
(the reference terms are 0 when ``reference_free``), the losses are:

* ``sigmoid`` -- DPO (Rafailov et al. 2023, Eq. 7): ``-logsigmoid(beta*h)``; with label
  smoothing ``eps`` > 0 the conservative cDPO loss
  ``-(1-eps)*logsigmoid(beta*h) - eps*logsigmoid(-beta*h)``.
* ``robust`` -- provably robust DPO (Chowdhury et al. 2024), unbiased under label-flip rate eps:
  ``(-(1-eps)*logsigmoid(beta*h) + eps*logsigmoid(-beta*h)) / (1-2*eps)``.
* ``hinge`` -- SLiC (Zhao et al. 2023): ``relu(1 - beta*h)``.
* ``ipo`` -- IPO (Azar et al. 2023): ``(h_avg - 1/(2*beta))**2`` where ``h_avg`` is built from
  length-averaged log-probs (each log-prob divided by its sequence's token count).

All arithmetic is done in float32 whatever the input dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dpokit.errors import ConfigError

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(frozen=True)
class LossConfig:
    """Which preference loss to use and its hyper-parameters (validated on construction).

    ``label_smoothing`` is the assumed label-flip rate eps in [0, 0.5); it is only meaningful for
    ``sigmoid`` (cDPO) and ``robust`` and is rejected for the other loss types.
    ``sft_weight`` adds ``sft_weight * (-policy_chosen / chosen_token_counts)`` (the chosen
    response's mean per-token NLL) to every per-pair loss.
    """

    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    reference_free: bool = False
    sft_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(
                f"unknown loss_type {self.loss_type!r}; expected one of {', '.join(LOSS_TYPES)}"
            )
        if not _is_number(self.beta) or not math.isfinite(self.beta) or self.beta <= 0:
            raise ConfigError(f"beta must be a finite number > 0, got {self.beta!r}")
        ls = self.label_smoothing
        if not _is_number(ls) or not 0.0 <= ls < 0.5:
            raise ConfigError(f"label_smoothing must be a number in [0, 0.5), got {ls!r}")
        if ls > 0 and self.loss_type not in ("sigmoid", "robust"):
            raise ConfigError(
                f"label_smoothing={ls} is only supported with loss_type 'sigmoid' (cDPO) or "
                f"'robust', not {self.loss_type!r}"
            )
        sw = self.sft_weight
        if not _is_number(sw) or not math.isfinite(sw) or sw < 0:
            raise ConfigError(f"sft_weight must be a finite number >= 0, got {sw!r}")
        if not isinstance(self.reference_free, bool):
            raise ConfigError(f"reference_free must be true or false, got {self.reference_free!r}")


@dataclass
class PreferenceLossOutput:
    """Per-pair results of :func:`preference_loss` (all shape ``[n]``, float32)."""

    losses: Tensor  # per-pair loss, including the sft term when sft_weight > 0
    chosen_rewards: Tensor  # beta * (policy_chosen - reference_chosen), detached
    rejected_rewards: Tensor  # beta * (policy_rejected - reference_rejected), detached


def _check_1d(name: str, t: Tensor, n: int | None) -> int:
    if t.dim() != 1 or (n is not None and t.shape[0] != n):
        want = "[n]" if n is None else f"[{n}]"
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    return t.shape[0]


def preference_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    reference_chosen: Tensor | None,
    reference_rejected: Tensor | None,
    config: LossConfig,
    *,
    chosen_token_counts: Tensor | None = None,
    rejected_token_counts: Tensor | None = None,
) -> PreferenceLossOutput:
    """Per-pair preference loss and implicit rewards (see the module docstring for formulas).

    Args:
        policy_chosen, policy_rejected: policy log-probs summed over response tokens, ``[n]``.
        reference_chosen, reference_rejected: same for the frozen reference model; may be None
            only when ``config.reference_free`` (and are ignored then).
        config: the loss to compute.
        chosen_token_counts, rejected_token_counts: number of scored response tokens per
            sequence, ``[n]``, every entry >= 1 (not checked, to avoid a device sync). Both are
            required for ``ipo``; ``chosen_token_counts`` is required when ``sft_weight > 0``.

    Returns:
        :class:`PreferenceLossOutput` with unreduced ``[n]`` float32 tensors. Rewards are always
        ``beta * (policy - reference)`` on the summed log-probs (reference 0 when
        reference-free), also for ``ipo``.
    """
    n = _check_1d("policy_chosen", policy_chosen, None)
    _check_1d("policy_rejected", policy_rejected, n)
    pc, pr = policy_chosen.float(), policy_rejected.float()
    if config.reference_free:
        rc = rr = torch.zeros_like(pc)
    else:
        if reference_chosen is None or reference_rejected is None:
            raise ValueError("reference log-probs are required unless config.reference_free")
        _check_1d("reference_chosen", reference_chosen, n)
        _check_1d("reference_rejected", reference_rejected, n)
        rc, rr = reference_chosen.float(), reference_rejected.float()

    beta, eps = config.beta, config.label_smoothing
    if config.loss_type == "ipo":
        if chosen_token_counts is None or rejected_token_counts is None:
            raise ValueError("loss_type 'ipo' needs chosen_token_counts and rejected_token_counts")
        _check_1d("chosen_token_counts", chosen_token_counts, n)
        _check_1d("rejected_token_counts", rejected_token_counts, n)
        cc, cr = chosen_token_counts.float(), rejected_token_counts.float()
        h = (pc - rc) / cc - (pr - rr) / cr
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        h = (pc - pr) - (rc - rr)
        if config.loss_type == "sigmoid":
            losses = -(1.0 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
        elif config.loss_type == "robust":
            losses = (
                -(1.0 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)
            ) / (1.0 - 2.0 * eps)
        else:  # hinge
            losses = torch.relu(1.0 - beta * h)

    if config.sft_weight > 0:
        if chosen_token_counts is None:
            raise ValueError("sft_weight > 0 needs chosen_token_counts")
        _check_1d("chosen_token_counts", chosen_token_counts, n)
        losses = losses + config.sft_weight * (-pc / chosen_token_counts.float())

    return PreferenceLossOutput(
        losses=losses,
        chosen_rewards=(beta * (pc - rc)).detach(),
        rejected_rewards=(beta * (pr - rr)).detach(),
    )


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
