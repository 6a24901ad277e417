"""Tests for dpokit.losses.formulas: every further loss (TRL's names, dpop, simpo, orpo) against hand-computed
values, hand-derived gradients and torch.autograd.gradcheck; TRL parity is in losses/test_losses_trl.py."""

from __future__ import annotations

import math

import pytest
import torch

import dpokit.losses.formulas as lf
from dpokit.losses.formulas import exo_pair_loss
from dpokit.losses.dispatch import LossConfig, preference_loss, unpaired_loss
from loss_helpers import BETA, PR, RC, RR, close, log_odds, one_pair, random_batch, sigmoid, softplus_neg, t


# The pair of loss_helpers: chosen log-ratio cl = 1, rejected log-ratio rl = -0.5, margin h = 1.5, beta = 0.1;
# token counts 4 and 6, so the policy's mean per-token log-probs are -10/4 = -2.5 and -12/6 = -2.
q = sigmoid(0.15)  # EXO's model preference probability sigma(beta*h)
HAND_VALUES = [
    (LossConfig("bco_pair", BETA), softplus_neg(0.1) + softplus_neg(0.05)),  # -logsig(r_w) - logsig(-r_l)
    (LossConfig("nca_pair", BETA), softplus_neg(0.1) + 0.5 * softplus_neg(-0.1) + 0.5 * softplus_neg(0.05)),
    (LossConfig("sppo_hard", BETA), (1 - 5) ** 2 + (-0.5 + 5) ** 2),
    (LossConfig("apo_zero", BETA), (1 - sigmoid(0.1)) + sigmoid(-0.05)),
    (LossConfig("apo_down", BETA), sigmoid(0.1) + (1 - sigmoid(0.15))),
    (LossConfig("exo_pair", BETA, 0.1),
     q * (math.log(q) - math.log(0.9)) + (1 - q) * (math.log(1 - q) - math.log(0.1))),
    (LossConfig("sigmoid_norm", BETA), softplus_neg(0.1 * (1 / 4 + 0.5 / 6))),  # h_avg = 1/4 - (-0.5)/6
    # SimPO: x = 2*(-2.5 - -2) - 0.5 = -1.5 (beta 2, gamma 0.5 by default); cSimPO with eps 0.1
    (LossConfig("simpo", 2.0), softplus_neg(-1.5)),
    (LossConfig("simpo", 2.0, simpo_gamma=1.0), softplus_neg(-2.0)),
    (LossConfig("simpo", 2.0, 0.1), 0.9 * softplus_neg(-1.5) + 0.1 * softplus_neg(1.5)),
    # ORPO: mean NLL of the chosen response (2.5) + lambda * -log sigmoid(log odds ratio)
    (LossConfig("orpo", BETA), 2.5 + 0.1 * softplus_neg(log_odds(-2.5, -2.0))),
]


@pytest.mark.parametrize("cfg, expected", HAND_VALUES,
                         ids=[f"{c.loss_type}-{i}" for i, (c, _) in enumerate(HAND_VALUES)])
def test_further_losses_hand_values(cfg, expected):
    out = one_pair(cfg, chosen_token_counts=t(4), rejected_token_counts=t(6))
    close(out.losses, expected, tol=1e-5)


def test_exo_pair_is_minimised_where_the_model_agrees_with_the_smoothed_labels():
    """KL(q || p) is 0 exactly when sigma(beta*h) = 1 - eps, i.e. beta*h = log((1-eps)/eps)."""
    eps = 0.1
    h = torch.tensor([math.log(9.0) / BETA], dtype=torch.float64)
    assert exo_pair_loss(h, BETA, eps).item() == pytest.approx(0.0, abs=1e-12)
    assert exo_pair_loss(h * 1.1, BETA, eps).item() > 1e-4 and exo_pair_loss(h * 0.9, BETA, eps).item() > 1e-4


def test_orpo_is_stable_for_near_certain_and_unlikely_responses():
    # mean log-probs -1e-6 (P ~ 1) and -50 (P ~ 0): log1mexp on both sides of -log 2
    out = preference_loss(t(-4e-6), t(-300.0), None, None, LossConfig("orpo", 1.0),
                          chosen_token_counts=t(4), rejected_token_counts=t(6))
    expected = 1e-6 + softplus_neg((-1e-6 + 50) - (math.log(-math.expm1(-1e-6)) - math.log1p(-math.exp(-50))))
    assert math.isfinite(out.losses.item())
    close(out.losses, expected, tol=1e-5)



@pytest.mark.parametrize("loss_type", ["bco_pair", "nca_pair", "sppo_hard", "apo_zero", "apo_down", "exo_pair",
                                       "sigmoid_norm", "simpo", "orpo"])
def test_further_losses_hand_derived_gradients(loss_type):
    """d loss / d (summed policy log-probs), derived by hand per loss, against autograd."""
    beta, eps, gamma = 0.3, 0.05, 0.7
    pc, pr, rc, rr, cc, cr = random_batch(seed=10)
    if loss_type in ("simpo", "orpo"):
        # mean per-token log-probs in (-3, 0): ORPO's log(1 - P) is sensitive there
        pc, pr = (pc.detach() / 20).requires_grad_(), (pr.detach() / 20).requires_grad_()
    cfg = LossConfig(loss_type, beta, eps if loss_type in ("exo_pair", "simpo") else 0.0,
                     simpo_gamma=gamma if loss_type == "simpo" else None)
    preference_loss(pc, pr, rc, rr, cfg, chosen_token_counts=cc, rejected_token_counts=cr).losses.sum().backward()
    sig = torch.sigmoid
    pcd, prd, rc, rr, cc, cr = (x.detach().double() for x in (pc, pr, rc, rr, cc, cr))
    cl, rl = pcd - rc, prd - rr
    rw, rlw = beta * cl, beta * rl
    if loss_type == "bco_pair":  # -logsig(rw) - logsig(-rl)
        dc, dr = -beta * sig(-rw), beta * sig(rlw)
    elif loss_type == "nca_pair":  # -logsig(rw) - logsig(-rw)/2 - logsig(-rl)/2
        dc, dr = -beta * sig(-rw) + 0.5 * beta * sig(rw), 0.5 * beta * sig(rlw)
    elif loss_type == "sppo_hard":
        dc, dr = 2 * (cl - 0.5 / beta), 2 * (rl + 0.5 / beta)
    elif loss_type == "apo_zero":  # 1 - sig(rw) + sig(rl)
        dc, dr = -beta * sig(rw) * sig(-rw), beta * sig(rlw) * sig(-rlw)
    elif loss_type == "apo_down":  # sig(rw) + 1 - sig(rw - rl)
        d = sig(rw - rlw) * sig(rlw - rw)
        dc, dr = beta * sig(rw) * sig(-rw) - beta * d, beta * d
    elif loss_type == "exo_pair":  # dL/dx = q(1-q)(x - log((1-eps)/eps)), x = beta*h
        x = beta * (cl - rl)
        dx = sig(x) * sig(-x) * (x - math.log((1 - eps) / eps))
        dc, dr = beta * dx, -beta * dx
    elif loss_type == "sigmoid_norm":  # -logsig(beta*(cl/cc - rl/cr))
        w = sig(-beta * (cl / cc - rl / cr))
        dc, dr = -beta * w / cc, beta * w / cr
    elif loss_type == "simpo":  # x = beta*(pc/cc - pr/cr) - gamma; -(1-eps)logsig(x) - eps*logsig(-x)
        x = beta * (pcd / cc - prd / cr) - gamma
        dx = -(1 - eps) * sig(-x) + eps * sig(x)
        dc, dr = beta * dx / cc, -beta * dx / cr
    else:  # orpo: -c - lam*logsig(z), dz/dc = 1/(1-e^c), dz/dr = -1/(1-e^r), c, r mean log-probs
        c, r = pcd / cc, prd / cr
        z = (c - r) - (torch.log1p(-torch.exp(c)) - torch.log1p(-torch.exp(r)))
        dc = (-1 - beta * sig(-z) / (1 - torch.exp(c))) / cc
        dr = (beta * sig(-z) / (1 - torch.exp(r))) / cr
    torch.testing.assert_close(pc.grad.double(), dc, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(pr.grad.double(), dr, rtol=1e-4, atol=1e-6)


FORMULAS = {  # formula -> (number of tensor inputs, its scalar arguments)
    "sigmoid_loss": (1, (0.3, 0.1)), "robust_loss": (1, (0.3, 0.1)), "hinge_loss": (1, (0.3,)),
    "ipo_loss": (1, (0.3,)), "sigmoid_norm_loss": (1, (0.3,)), "exo_pair_loss": (1, (0.3, 0.01)),
    "nca_pair_loss": (2, (0.3,)), "bco_pair_loss": (2, (0.3,)), "sppo_hard_loss": (2, (0.3,)),
    "apo_zero_loss": (2, (0.3,)), "apo_down_loss": (2, (0.3,)), "simpo_loss": (2, (2.0, 0.5, 0.1)),
    "orpo_loss": (2, (0.3,)), "dpop_loss": (2, (0.3, 5.0)),
}


@pytest.mark.parametrize("name", sorted(FORMULAS))
def test_formula_gradients_gradcheck(name):
    """Every formula's autograd gradient against finite differences (float64), on inputs away from the hinge's
    kink and inside ORPO's domain (mean log-probs < 0)."""
    n_inputs, scalars = FORMULAS[name]
    g = torch.Generator().manual_seed(0)
    inputs = [-(torch.rand(8, generator=g, dtype=torch.float64) * 3 + 0.05) for _ in range(n_inputs)]
    if name == "hinge_loss":
        inputs = [torch.linspace(-20.0, 20.0, 8, dtype=torch.float64) + 0.123]  # beta*h never exactly 1
    fn = getattr(lf, name)
    assert torch.autograd.gradcheck(lambda *xs: fn(*xs, *scalars), [x.requires_grad_() for x in inputs])



# ---------------------------------------------------------------- DPO-Positive


def test_dpop_value_and_penalty():
    # chosen log-ratio +1 >= 0: no penalty, DPO's value
    close(one_pair(LossConfig("dpop", BETA)).losses, softplus_neg(0.15))
    # chosen log-ratio -12 - -11 = -1 < 0: h = -1 - (-0.5) = -0.5, x = 0.1*(-0.5 - 50*1) = -5.05 (lambda 50)
    out = preference_loss(t(-12.0), t(PR), t(RC), t(RR), LossConfig("dpop", BETA))
    close(out.losses, softplus_neg(-5.05), tol=1e-5)
    out = preference_loss(t(-12.0), t(PR), t(RC), t(RR), LossConfig("dpop", BETA, dpop_lambda=2.0))
    close(out.losses, softplus_neg(0.1 * (-0.5 - 2.0)), tol=1e-5)


def test_dpop_gradient():
    """x = beta*(h - lam*relu(-cl)): dL/dpc = -sigma(-x)*beta*(1 + lam*[cl < 0]), dL/dpr = sigma(-x)*beta."""
    beta, lam = 0.2, 5.0
    pc, pr, rc, rr, _, _ = random_batch(seed=11)
    preference_loss(pc, pr, rc, rr, LossConfig("dpop", beta, dpop_lambda=lam)).losses.sum().backward()
    cl, rl = (pc.detach() - rc).double(), (pr.detach() - rr).double()
    below = (cl < 0).double()
    assert 0 < below.sum() < len(below)  # both sides of the penalty's kink
    x = beta * (cl - rl - lam * torch.relu(-cl))
    torch.testing.assert_close(pc.grad.double(), -torch.sigmoid(-x) * beta * (1 + lam * below), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pr.grad.double(), torch.sigmoid(-x) * beta, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- KTO (unpaired)


def test_kto_hand_values():
    """Log-ratios 1, -2, 0.5 (desirable, undesirable, undesirable); KL log-ratios 0.3, 0.5, -0.2, so z0 = 0.2;
    beta 0.1, weights 2 and 0.5: 2*(1 - sig(0.1*(1 - 0.2))), 0.5*(1 - sig(0.1*(0.2 + 2))), 0.5*(1 - sig(0.1*(0.2 -
    0.5)))."""
    out = unpaired_loss(t(1.0, -2.0, 0.5), t(0.0, 0.0, 0.0), t(0.3, 0.5, -0.2), t(0.0, 0.0, 0.0),
                        torch.tensor([True, False, False]),
                        LossConfig("kto", BETA, desirable_weight=2.0, undesirable_weight=0.5))
    expected = [2 * (1 - sigmoid(0.08)), 0.5 * (1 - sigmoid(0.22)), 0.5 * (1 - sigmoid(-0.03))]
    torch.testing.assert_close(out.losses, torch.tensor(expected), rtol=0, atol=1e-6)
    assert out.kl.item() == pytest.approx(0.2, abs=1e-6)
    torch.testing.assert_close(out.rewards, t(0.1, -0.2, 0.05))
    # a negative KL estimate is clamped to 0: here the mean KL log-ratio is -1
    clamped = unpaired_loss(t(1.0), t(0.0), t(-1.5, -0.5), t(0.0, 0.0), torch.tensor([True]), LossConfig("kto", BETA))
    assert clamped.kl.item() == 0.0
    close(clamped.losses, 1 - sigmoid(0.1))


def test_kto_gradient():
    """x = beta*(r - z0) for a desirable example, beta*(z0 - r) for an undesirable one; dL/dpolicy =
    -+ w*beta*sig(x)*(1 - sig(x)) (minus for desirable), and nothing flows into the KL estimate."""
    beta, w_d, w_u = 0.3, 1.5, 0.7
    policy, _, reference, _, _, _ = random_batch(seed=12)
    policy_kl = (policy.detach() + 2.0).requires_grad_()  # mismatched pairs: log-ratio mean > 0, no clamping
    desirable = torch.arange(len(policy)) % 3 != 0
    out = unpaired_loss(policy, reference, policy_kl, reference, desirable,
                        LossConfig("kto", beta, desirable_weight=w_d, undesirable_weight=w_u))
    out.losses.sum().backward()
    assert policy_kl.grad is None  # z0 is a constant
    r = (policy.detach() - reference).double()
    z0 = (policy_kl.detach() - reference).double().mean()
    assert z0 > 0
    x = torch.where(desirable, beta * (r - z0), beta * (z0 - r))
    slope = beta * torch.sigmoid(x) * (1 - torch.sigmoid(x))
    expected = torch.where(desirable, -w_d * slope, w_u * slope)
    torch.testing.assert_close(policy.grad.double(), expected, rtol=1e-5, atol=1e-7)
