"""Shared inputs and hand-computation helpers of the loss tests (test_losses, test_loss_formulas)."""

from __future__ import annotations

import math

import torch

from dpokit.losses.dispatch import LossConfig, PreferenceLossOutput, preference_loss

# One concrete pair used by the hand-computed tests: h = (pc - pr) - (rc - rr) = 2 - 0.5 = 1.5.
PC, PR, RC, RR = -10.0, -12.0, -11.0, -11.5
BETA = 0.1


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


def softplus(x: float) -> float:
    """log(1 + exp(x)) = -logsigmoid(-x), computed by hand."""
    return math.log(1.0 + math.exp(x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def one_pair(cfg: LossConfig, **kw) -> PreferenceLossOutput:
    return preference_loss(t(PC), t(PR), t(RC), t(RR), cfg, **kw)


def close(actual: torch.Tensor, expected: float, tol: float = 1e-6) -> None:
    assert actual.shape == (1,)
    assert math.isclose(actual.item(), expected, rel_tol=tol, abs_tol=tol), (actual.item(), expected)


def softplus_neg(x: float) -> float:
    """-log sigmoid(x)."""
    return softplus(-x)


def log_odds(avg_c: float, avg_r: float) -> float:
    return (avg_c - avg_r) - (math.log(1 - math.exp(avg_c)) - math.log(1 - math.exp(avg_r)))



def random_batch(n: int = 64, seed: int = 0):
    """Random summed log-probs in [-61, -1] (policy ones require grad) and token counts in [1, 49]."""
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(4, n, generator=g, dtype=torch.float64) * 60 - 1  # in [-61, -1]
    pc, pr, rc, rr = (x.float() for x in logps)
    counts = torch.randint(1, 50, (2, n), generator=g).float()
    return pc.requires_grad_(), pr.requires_grad_(), rc, rr, counts[0], counts[1]
