"""The preference losses themselves: one pure, elementwise function per loss type.

Each function maps per-pair tensors (shape ``[n]``) to per-pair losses ``[n]``; it builds no model, does no
batching and no reduction, and works in whatever floating dtype it is given (``dpokit.losses.dispatch`` passes float32).
Names follow TRL's ``loss_type`` strings so that a TRL config carries over. The inputs are:

* ``margin`` ``h = (log pi(y_w) - log pi(y_l)) - (log ref(y_w) - log ref(y_l))`` on summed log-probs;
* ``avg_margin``: the same with every log-prob divided by its response's token count;
* ``chosen_logratio`` / ``rejected_logratio``: ``log pi(y) - log ref(y)`` (summed) of each response;
* ``chosen_avg`` / ``rejected_avg``: the policy's mean per-token log-prob of each response (no reference).

``r_w = beta * chosen_logratio`` and ``r_l = beta * rejected_logratio`` are the implicit rewards.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def sigmoid_loss(margin: Tensor, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """DPO (Rafailov et al. 2023, Eq. 7): ``-logsigmoid(beta*h)``; with ``label_smoothing`` eps > 0 the
    conservative cDPO loss ``-(1-eps)*logsigmoid(beta*h) - eps*logsigmoid(-beta*h)``."""
    x = beta * margin
    return -(1.0 - label_smoothing) * F.logsigmoid(x) - label_smoothing * F.logsigmoid(-x)


def robust_loss(margin: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """Provably robust DPO (Chowdhury et al. 2024), unbiased under a label-flip rate eps:
    ``(-(1-eps)*logsigmoid(beta*h) + eps*logsigmoid(-beta*h)) / (1-2*eps)``."""
    x = beta * margin
    eps = label_smoothing
    return (-(1.0 - eps) * F.logsigmoid(x) + eps * F.logsigmoid(-x)) / (1.0 - 2.0 * eps)


def hinge_loss(margin: Tensor, beta: float) -> Tensor:
    """SLiC-HF's calibration loss (Zhao et al. 2023) on the DPO margin: ``relu(1 - beta*h)``."""
    return torch.relu(1.0 - beta * margin)


def ipo_loss(avg_margin: Tensor, beta: float) -> Tensor:
    """IPO (Azar et al. 2023, Eq. 17; beta is the paper's tau): ``(h_avg - 1/(2*beta))**2`` on the
    length-averaged margin, as the IPO authors and TRL compute it."""
    return (avg_margin - 1.0 / (2.0 * beta)) ** 2


def sigmoid_norm_loss(avg_margin: Tensor, beta: float) -> Tensor:
    """Length-normalised DPO (Tülu 3, Lambert et al. 2024): ``-logsigmoid(beta*h_avg)``, DPO on the margin of
    per-token mean log-probs, so longer responses are not favoured merely for having more tokens."""
    return -F.logsigmoid(beta * avg_margin)


def exo_pair_loss(margin: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """EXO (Ji et al. 2024, Eq. 16, K = 2): the reverse KL ``KL(q || p)`` from the model's preference
    distribution ``q = (sigmoid(beta*h), sigmoid(-beta*h))`` to the smoothed labels ``p = (1-eps, eps)``:
    ``q_w*(log q_w - log(1-eps)) + q_l*(log q_l - log eps)``; eps must be > 0 (the paper suggests 1e-3)."""
    x = beta * margin
    eps = label_smoothing
    chosen = torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-eps))
    rejected = torch.sigmoid(-x) * (F.logsigmoid(-x) - math.log(eps))
    return chosen + rejected


def nca_pair_loss(chosen_logratio: Tensor, rejected_logratio: Tensor, beta: float) -> Tensor:
    """NCA (Chen et al. 2024, noise-contrastive alignment), pairwise:
    ``-logsigmoid(r_w) - 0.5*logsigmoid(-r_w) - 0.5*logsigmoid(-r_l)``: raises the chosen response's own
    reward instead of only the margin."""
    r_w, r_l = beta * chosen_logratio, beta * rejected_logratio
    return -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)


def bco_pair_loss(chosen_logratio: Tensor, rejected_logratio: Tensor, beta: float) -> Tensor:
    """BCO (Jung et al. 2024, binary classifier optimisation) on pairs: ``-logsigmoid(r_w) - logsigmoid(-r_l)``,
    chosen rewards classified positive and rejected negative. As in TRL 1.16 there is no reward shift: the
    paper's running mean reward delta is not subtracted (so the loss has no state)."""
    r_w, r_l = beta * chosen_logratio, beta * rejected_logratio
    return -F.logsigmoid(r_w) - F.logsigmoid(-r_l)


def sppo_hard_loss(chosen_logratio: Tensor, rejected_logratio: Tensor, beta: float) -> Tensor:
    """SPPO (Wu et al. 2024, Eq. 4.7) with hard win probabilities (1 for the chosen, 0 for the rejected):
    ``(chosen_logratio - 1/(2*beta))**2 + (rejected_logratio + 1/(2*beta))**2``."""
    half = 0.5 / beta
    return (chosen_logratio - half) ** 2 + (rejected_logratio + half) ** 2


def apo_zero_loss(chosen_logratio: Tensor, rejected_logratio: Tensor, beta: float) -> Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, Eq. 7): ``(1 - sigmoid(r_w)) + sigmoid(r_l)``: raises the chosen
    likelihood and lowers the rejected one; for chosen responses better than the model's own."""
    return (1.0 - torch.sigmoid(beta * chosen_logratio)) + torch.sigmoid(beta * rejected_logratio)


def apo_down_loss(chosen_logratio: Tensor, rejected_logratio: Tensor, beta: float) -> Tensor:
    """APO-down (D'Oosterlinck et al. 2024, Eq. 8): ``sigmoid(r_w) + (1 - sigmoid(r_w - r_l))``: lowers both
    likelihoods, the rejected one more; for chosen responses worse than the model's own."""
    r_w, r_l = beta * chosen_logratio, beta * rejected_logratio
    return torch.sigmoid(r_w) + (1.0 - torch.sigmoid(r_w - r_l))


def dpop_loss(margin: Tensor, chosen_logratio: Tensor, beta: float, lam: float) -> Tensor:
    """DPO-Positive (Pal et al. 2024, Smaug): ``-logsigmoid(beta*(h - lam*max(0, -chosen_logratio)))``:
    DPO plus a penalty, weighted by lam, whenever the chosen response's log-prob falls below the reference's."""
    return -F.logsigmoid(beta * (margin - lam * torch.relu(-chosen_logratio)))


def simpo_loss(chosen_avg: Tensor, rejected_avg: Tensor, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> Tensor:
    """SimPO (Meng et al. 2024), reference-free with a target reward margin gamma:
    ``-logsigmoid(beta*(chosen_avg - rejected_avg) - gamma)`` on mean per-token log-probs; with
    ``label_smoothing`` eps > 0 the conservative form ``-(1-eps)*logsigmoid(x) - eps*logsigmoid(-x)``
    (as TRL's CPOTrainer)."""
    x = beta * (chosen_avg - rejected_avg) - gamma
    return -(1.0 - label_smoothing) * F.logsigmoid(x) - label_smoothing * F.logsigmoid(-x)


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate on both sides of ``-log 2`` (Mächler 2012)."""
    return torch.where(x < -math.log(2.0), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_log_odds_ratio(chosen_avg: Tensor, rejected_avg: Tensor) -> Tensor:
    """``log(odds(y_w) / odds(y_l))`` with ``odds(y) = P(y) / (1 - P(y))`` and ``log P(y)`` the mean per-token
    log-prob (Hong et al. 2024)."""
    return (chosen_avg - rejected_avg) - (log1mexp(chosen_avg) - log1mexp(rejected_avg))


def orpo_loss(chosen_avg: Tensor, rejected_avg: Tensor, lam: float) -> Tensor:
    """ORPO (Hong et al. 2024), reference-free:
    ``-chosen_avg - lam*logsigmoid(log_odds_ratio)``: the chosen response's mean per-token NLL (the SFT term)
    plus lam times the odds-ratio term. TRL's ORPOConfig calls lam ``beta``."""
    return -chosen_avg - lam * F.logsigmoid(orpo_log_odds_ratio(chosen_avg, rejected_avg))


def kto_loss(logratio: Tensor, desirable: Tensor, kl: Tensor, beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> Tensor:
    """KTO (Ethayarajh et al. 2024, Eq. 7-8), on UNPAIRED examples: with ``r = log pi(y|x) - log ref(y|x)``
    (summed) and ``z0`` the KL estimate ``kl``, a desirable example's loss is
    ``desirable_weight * (1 - sigmoid(beta*(r - z0)))`` and an undesirable one's
    ``undesirable_weight * (1 - sigmoid(beta*(z0 - r)))``. ``desirable`` is the bool label of each example; ``kl``
    a scalar, taken as a constant (the paper and TRL do not back-propagate through it; see
    :func:`kto_kl_estimate`)."""
    kl = kl.detach()
    gain = torch.where(desirable, beta * (logratio - kl), beta * (kl - logratio))
    weight = torch.where(desirable, torch.full_like(logratio, desirable_weight),
                         torch.full_like(logratio, undesirable_weight))
    return weight * (1.0 - torch.sigmoid(gain))


def kto_kl_estimate(kl_logratio: Tensor) -> Tensor:
    """KTO's reference point ``z0``: the batch mean of ``log pi(y'|x) - log ref(y'|x)`` over MISMATCHED pairs
    (each prompt with another example's completion), clamped at 0 and detached, as the KTO paper (Sec. 4.1) and
    TRL's KTOTrainer estimate ``KL(pi || ref)``."""
    return kl_logratio.detach().mean().clamp(min=0)


def unlikelihood_token_loss(token_logps: Tensor, min_complement: float = 1e-5) -> Tensor:
    """Unlikelihood (Welleck et al. 2019) of each token: ``-log(1 - p)`` from its log-prob ``log p``, with
    ``1 - p`` floored at `min_complement` (as the authors' code clamps it) so that a token the model is sure of
    gives a large but finite loss."""
    return -log1mexp(token_logps.clamp(max=math.log1p(-min_complement)))


def bradley_terry_loss(chosen_reward: Tensor, rejected_reward: Tensor, margin: Tensor | None = None,
                       center_coefficient: float | None = None) -> Tensor:
    """A reward model's Bradley–Terry loss per pair (Ouyang et al. 2022; TRL's RewardTrainer):
    ``-logsigmoid(r_w - r_l - m)`` with an optional per-pair `margin` m, plus ``c * (r_w + r_l)**2`` with the
    `center_coefficient` c (Eisenstein et al. 2023), whose mean over pairs is TRL's ``c * mean((r_w + r_l)**2)``."""
    difference = chosen_reward - rejected_reward
    if margin is not None:
        difference = difference - margin
    loss = -F.logsigmoid(difference)
    if center_coefficient:
        loss = loss + center_coefficient * (chosen_reward + rejected_reward) ** 2
    return loss
