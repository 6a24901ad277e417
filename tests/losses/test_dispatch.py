"""Tests for dpokit.losses.dispatch: hand-computed values, analytic gradients, the DPO optimum, and how preference_loss
builds the further losses' inputs (mixtures, WPO weights, reference-free losses). The further losses' formulas are
tested in losses/test_formulas.py, LossConfig in losses/test_loss_config.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dpokit.losses.dispatch import LossConfig, preference_loss, preference_metrics, sft_loss, unlikelihood_loss
from loss_helpers import BETA, PC, PR, RC, RR, close, one_pair, random_batch, t


# ---------------------------------------------------------------- 1. hand-computed values


def test_sigmoid_value():
    # -log sigmoid(0.15) = log(1 + exp(-0.15))
    close(one_pair(LossConfig("sigmoid", BETA)).losses, math.log(1 + math.exp(-0.15)))


def test_cdpo_value():
    expected = 0.9 * math.log(1 + math.exp(-0.15)) + 0.1 * math.log(1 + math.exp(0.15))
    close(one_pair(LossConfig("sigmoid", BETA, label_smoothing=0.1)).losses, expected)


def test_robust_value():
    expected = (0.9 * math.log(1 + math.exp(-0.15)) - 0.1 * math.log(1 + math.exp(0.15))) / 0.8
    close(one_pair(LossConfig("robust", BETA, label_smoothing=0.1)).losses, expected)


def test_robust_with_zero_smoothing_equals_sigmoid():
    close(one_pair(LossConfig("robust", BETA)).losses, math.log(1 + math.exp(-0.15)))


def test_hinge_active_and_inactive():
    close(one_pair(LossConfig("hinge", BETA)).losses, 1.0 - 0.15)  # beta*h = 0.15 < 1
    # h = (-1 - -20) - 0.5 = 18.5, beta*h = 1.85 >= 1: no loss
    out = preference_loss(t(-1.0), t(-20.0), t(RC), t(RR), LossConfig("hinge", BETA))
    close(out.losses, 0.0)
    # just inside the margin: h = 9.5 - 0.5 = 9, beta*h = 0.9 -> 0.1
    out = preference_loss(t(-2.5), t(-12.0), t(RC), t(RR), LossConfig("hinge", BETA))
    close(out.losses, 0.1, tol=1e-5)


def test_ipo_uses_length_averaged_logps():
    # counts 4 and 6: h = (-10 + 11)/4 - (-12 + 11.5)/6 = 1/4 + 1/12 = 1/3; 1/(2 beta) = 5
    out = one_pair(LossConfig("ipo", BETA), chosen_token_counts=t(4), rejected_token_counts=t(6))
    close(out.losses, (1 / 3 - 5) ** 2)
    # rewards are still on the summed log-probs
    close(out.chosen_rewards, 0.1 * 1.0)
    close(out.rejected_rewards, 0.1 * -0.5)


def test_ipo_accepts_integer_counts():
    out = one_pair(
        LossConfig("ipo", 0.5),
        chosen_token_counts=torch.tensor([4]),
        rejected_token_counts=torch.tensor([6]),
    )
    close(out.losses, (1 / 3 - 1.0) ** 2)


def test_rewards_values_and_detached():
    pc = t(PC).requires_grad_()
    out = preference_loss(pc, t(PR), t(RC), t(RR), LossConfig("sigmoid", BETA))
    close(out.chosen_rewards, 0.1)  # 0.1 * (-10 + 11)
    close(out.rejected_rewards, -0.05)  # 0.1 * (-12 + 11.5)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    assert out.losses.requires_grad


def test_reference_free():
    cfg = LossConfig("sigmoid", BETA, reference_free=True)
    for rc, rr in ((None, None), (t(RC), t(RR))):  # references are ignored when given
        out = preference_loss(t(PC), t(PR), rc, rr, cfg)
        close(out.losses, math.log(1 + math.exp(-0.2)))  # h = 2
        close(out.chosen_rewards, -1.0)
        close(out.rejected_rewards, -1.2)


def test_sft_weight_term():
    cfg = LossConfig("sigmoid", BETA, sft_weight=0.5)
    out = one_pair(cfg, chosen_token_counts=t(4))
    # + 0.5 * (10 / 4)
    close(out.losses, math.log(1 + math.exp(-0.15)) + 1.25)
    cfg = LossConfig("ipo", BETA, sft_weight=2.0)
    out = one_pair(cfg, chosen_token_counts=t(4), rejected_token_counts=t(6))
    close(out.losses, (1 / 3 - 5) ** 2 + 2.0 * 2.5)


def test_batch_is_elementwise_and_float32():
    pc = torch.tensor([PC, -3.0], dtype=torch.bfloat16)
    out = preference_loss(
        pc, t(PR, -3.0).bfloat16(), t(RC, -3.0).double(), t(RR, -3.0), LossConfig("sigmoid", BETA)
    )
    assert out.losses.dtype == torch.float32 and out.chosen_rewards.dtype == torch.float32
    assert out.losses.shape == (2,)
    assert math.isclose(out.losses[1].item(), math.log(2), rel_tol=1e-6)  # h = 0


def test_large_margins_are_stable():
    out = preference_loss(t(0.0, -5000.0), t(-5000.0, 0.0), t(0.0, 0.0), t(0.0, 0.0), LossConfig())
    assert torch.isfinite(out.losses).all()
    assert out.losses[0].item() == pytest.approx(0.0, abs=1e-6)
    assert out.losses[1].item() == pytest.approx(500.0, rel=1e-6)  # -logsigmoid(-500) ~ 500


def test_metrics_accuracy_tie_counts_wrong():
    # pair 0: chosen reward 0.1 > -0.05 (right); pair 1: equal rewards (tie: wrong);
    # pair 2: chosen reward below rejected (wrong)
    pc, pr = t(PC, -5.0, -9.0), t(PR, -5.0, -1.0)
    out = preference_loss(pc, pr, t(RC, -5.0, -9.0), t(RR, -5.0, -9.0), LossConfig("sigmoid", BETA))
    m = preference_metrics(out, pc, pr)
    assert set(m) == {
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "loss",
    }
    assert m["rewards/accuracies"].tolist() == [1.0, 0.0, 0.0]
    assert m["rewards/margins"].tolist() == pytest.approx([0.15, 0.0, -0.8], abs=1e-6)
    assert m["rewards/chosen"].tolist() == pytest.approx([0.1, 0.0, 0.0], abs=1e-6)
    assert m["rewards/rejected"].tolist() == pytest.approx([-0.05, 0.0, 0.8], abs=1e-6)
    assert m["logps/chosen"].tolist() == [PC, -5.0, -9.0]
    assert m["logps/rejected"].tolist() == [PR, -5.0, -1.0]
    assert m["loss"].tolist() == pytest.approx(
        [math.log(1 + math.exp(-0.15)), math.log(2), math.log(1 + math.exp(0.8))], rel=1e-6
    )
    assert all(v.shape == (3,) and not v.requires_grad for v in m.values())


def test_sft_loss_is_per_sequence_sum():
    out = sft_loss(torch.tensor([-10.0, -3.5], dtype=torch.bfloat16), torch.tensor([4, 7]))
    assert out.dtype == torch.float32
    assert out.tolist() == [10.0, 3.5]
    with pytest.raises(ValueError):
        sft_loss(t(-1.0, -2.0), t(3.0))


def test_call_errors():
    with pytest.raises(ValueError, match="reference"):
        preference_loss(t(PC), t(PR), None, None, LossConfig())
    with pytest.raises(ValueError, match="ipo"):
        one_pair(LossConfig("ipo"), chosen_token_counts=t(4))
    with pytest.raises(ValueError, match="sft_weight"):
        one_pair(LossConfig(sft_weight=1.0))
    with pytest.raises(ValueError, match="shape"):
        preference_loss(t(PC, PC), t(PR), t(RC, RC), t(RR, RR), LossConfig())
    with pytest.raises(ValueError, match="shape"):
        preference_loss(t(PC).reshape(1, 1), t(PR), t(RC), t(RR), LossConfig())


# ---------------------------------------------------------------- 2. gradients



@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_sigmoid_gradient_matches_paper(beta):
    """dL/dpi_w = -beta*sigma(r_l - r_w), dL/dpi_l = +beta*sigma(r_l - r_w), r = beta*(pi - ref)."""
    pc, pr, rc, rr, _, _ = random_batch()
    preference_loss(pc, pr, rc, rr, LossConfig("sigmoid", beta)).losses.sum().backward()
    r_w = beta * (pc.detach().double() - rc.double())
    r_l = beta * (pr.detach().double() - rr.double())
    weight = torch.sigmoid(r_l - r_w)
    torch.testing.assert_close(pc.grad.double(), -beta * weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(pr.grad.double(), beta * weight, rtol=0, atol=1e-6)


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust"])
def test_smoothed_gradients(loss_type):
    beta, eps = 0.2, 0.1
    pc, pr, rc, rr, _, _ = random_batch(seed=1)
    preference_loss(pc, pr, rc, rr, LossConfig(loss_type, beta, eps)).losses.sum().backward()
    x = beta * ((pc.detach() - pr.detach()) - (rc - rr)).double()
    if loss_type == "sigmoid":  # d/dx [-(1-e) logsig(x) - e logsig(-x)]
        dx = -(1 - eps) * torch.sigmoid(-x) + eps * torch.sigmoid(x)
    else:  # d/dx [(-(1-e) logsig(x) + e logsig(-x)) / (1-2e)]
        dx = (-(1 - eps) * torch.sigmoid(-x) - eps * torch.sigmoid(x)) / (1 - 2 * eps)
    torch.testing.assert_close(pc.grad.double(), beta * dx, rtol=0, atol=1e-6)
    torch.testing.assert_close(pr.grad.double(), -beta * dx, rtol=0, atol=1e-6)


def test_hinge_gradient():
    beta = 0.1
    pc, pr, rc, rr, _, _ = random_batch(seed=2)
    preference_loss(pc, pr, rc, rr, LossConfig("hinge", beta)).losses.sum().backward()
    bh = beta * ((pc.detach() - pr.detach()) - (rc - rr)).double()
    active = (bh < 1).double()
    assert 0 < active.sum() < len(active)  # both regions are exercised
    torch.testing.assert_close(pc.grad.double(), -beta * active, rtol=0, atol=1e-7)
    torch.testing.assert_close(pr.grad.double(), beta * active, rtol=0, atol=1e-7)


def test_ipo_gradient():
    beta = 0.5
    pc, pr, rc, rr, cc, cr = random_batch(seed=3)
    cfg = LossConfig("ipo", beta)
    preference_loss(
        pc, pr, rc, rr, cfg, chosen_token_counts=cc, rejected_token_counts=cr
    ).losses.sum().backward()
    h = ((pc.detach() - rc) / cc - (pr.detach() - rr) / cr).double()
    d = 2 * (h - 1 / (2 * beta))
    torch.testing.assert_close(pc.grad.double(), d / cc.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pr.grad.double(), -d / cr.double(), rtol=1e-5, atol=1e-6)


def test_sft_term_gradient():
    beta, w = 0.1, 0.7
    pc, pr, rc, rr, cc, _ = random_batch(seed=4)
    cfg = LossConfig("sigmoid", beta, sft_weight=w)
    preference_loss(pc, pr, rc, rr, cfg, chosen_token_counts=cc).losses.sum().backward()
    weight = torch.sigmoid(beta * ((pr.detach() - rr) - (pc.detach() - rc)).double())
    expected = -beta * weight - w / cc.double()
    torch.testing.assert_close(pc.grad.double(), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(pr.grad.double(), beta * weight, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- 3. the DPO optimum (Eq. 4)

K = 4
REWARD = torch.tensor([1.0, 0.0, -0.5, 2.0], dtype=torch.float64)
PI_REF = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)


def optimal_policy(beta: float, reward: torch.Tensor = REWARD) -> torch.Tensor:
    """pi*(y) = pi_ref(y) exp(r(y)/beta) / Z  (paper Eq. 4)."""
    p = PI_REF * torch.exp(reward / beta)
    return p / p.sum()


def tv(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * (p.double() - q.double()).abs().sum().item()


def fit_tabular_policy(chosen, rejected, weights, cfg: LossConfig) -> torch.Tensor:
    """Minimise sum_k weights[k] * loss(chosen[k] > rejected[k]) over softmax logits (LBFGS)."""
    theta = torch.zeros(K, requires_grad=True)  # starts at the uniform policy
    ref_logp = PI_REF.log().float()
    opt = torch.optim.LBFGS(
        [theta],
        lr=1.0,
        max_iter=500,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        logp = F.log_softmax(theta, dim=0)
        out = preference_loss(logp[chosen], logp[rejected], ref_logp[chosen], ref_logp[rejected], cfg)
        loss = (weights * out.losses).sum()
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    return torch.softmax(theta.detach().double(), dim=0)


def all_ordered_pairs():
    pairs = [(i, j) for i in range(K) for j in range(K) if i != j]
    return torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])


@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_expected_dpo_loss_is_minimised_by_optimal_policy(beta):
    """Population DPO loss, pairs uniform over ordered (i, j), i != j, labelled by Bradley-Terry:
    sum_(i,j) sigma(r_i - r_j) * L_DPO(i > j). Its minimiser must be pi_ref*exp(r/beta)/Z
    (Eq. 4) to within total variation 1e-3. beta != 1 so that a misplaced beta is caught."""
    chosen, rejected = all_ordered_pairs()
    weights = torch.sigmoid(REWARD[chosen] - REWARD[rejected]).float() / len(chosen)
    target = optimal_policy(beta)
    # the test is meaningful: neither the start (uniform) nor pi_ref is already close
    assert tv(torch.full((K,), 1 / K), target) > 0.2 and tv(PI_REF, target) > 0.2
    pi = fit_tabular_policy(chosen, rejected, weights, LossConfig("sigmoid", beta))
    assert tv(pi, target) < 1e-3, (pi, target)


def test_expected_robust_loss_under_label_noise_recovers_optimal_policy():
    """Robust DPO is unbiased under label flips at rate eps: with BT labels flipped w.p. eps, the
    expected robust loss still has minimiser pi* (TV < 1e-3), while plain DPO on the same noisy
    labels does not (its implied rewards are shrunk)."""
    beta, eps = 1.0, 0.2
    chosen, rejected = all_ordered_pairs()
    p = torch.sigmoid(REWARD[chosen] - REWARD[rejected])
    weights = ((1 - eps) * p + eps * (1 - p)).float() / len(chosen)
    target = optimal_policy(beta)
    pi = fit_tabular_policy(chosen, rejected, weights, LossConfig("robust", beta, eps))
    assert tv(pi, target) < 1e-3, (pi, target)
    pi_plain = fit_tabular_policy(chosen, rejected, weights, LossConfig("sigmoid", beta))
    assert tv(pi_plain, target) > 0.05


def test_sampled_dpo_converges_to_optimal_policy():
    """20000 pairs: (i, j) uniform over i != j, i preferred w.p. sigma(r_i - r_j) (Bradley-Terry),
    fixed seed. Minimising the mean DPO loss (full batch, LBFGS) must give pi within total
    variation 0.05 of pi* = pi_ref*exp(r/beta)/Z. The finite-sample minimiser is not exact: over
    seeds 0..29 the observed TV was 0.004 on average and at most 0.013."""
    beta, n = 1.0, 20000
    g = torch.Generator().manual_seed(1234)
    i = torch.randint(0, K, (n,), generator=g)
    j = (i + torch.randint(1, K, (n,), generator=g)) % K
    i_wins = torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(REWARD[i] - REWARD[j])
    chosen, rejected = torch.where(i_wins, i, j), torch.where(i_wins, j, i)
    target = optimal_policy(beta)
    assert tv(torch.full((K,), 1 / K), target) > 0.2 and tv(PI_REF, target) > 0.2
    pi = fit_tabular_policy(chosen, rejected, torch.full((n,), 1 / n), LossConfig("sigmoid", beta))
    assert tv(pi, target) < 0.05, (pi, target)



# ---------------------------------------------------------------- 4. the further losses through preference_loss


def test_reference_free_losses_ignore_the_reference_and_reward_the_mean_logp():
    for cfg in (LossConfig("simpo", 2.0), LossConfig("orpo", 0.5)):
        assert cfg.reference_free  # set for them: no reference model is loaded
        a = preference_loss(t(PC), t(PR), None, None, cfg, chosen_token_counts=t(4), rejected_token_counts=t(6))
        b = one_pair(cfg, chosen_token_counts=t(4), rejected_token_counts=t(6))
        assert a.losses.item() == b.losses.item()
        close(a.chosen_rewards, cfg.beta * -2.5)
        close(a.rejected_rewards, cfg.beta * -2.0)
    # the others keep beta * summed log-ratio as reward
    out = one_pair(LossConfig("bco_pair", BETA))
    close(out.chosen_rewards, 0.1)
    close(out.rejected_rewards, -0.05)



def test_length_averaged_losses_need_the_counts():
    for loss in ("sigmoid_norm", "simpo", "orpo"):
        with pytest.raises(ValueError, match="rejected_token_counts"):
            one_pair(LossConfig(loss), chosen_token_counts=t(4))



def test_mixture_is_the_weighted_sum_per_pair():
    pc, pr, rc, rr, cc, cr = random_batch(seed=12)
    counts = {"chosen_token_counts": cc, "rejected_token_counts": cr}

    def losses(cfg):
        return preference_loss(pc, pr, rc, rr, cfg, **counts)

    parts = {name: losses(LossConfig(name, 0.2, 0.05 if name in ("sigmoid", "exo_pair") else 0.0)).losses
             for name in ("sigmoid", "bco_pair", "exo_pair", "ipo")}
    mixed = losses(LossConfig("sigmoid,bco_pair", 0.2, 0.05, loss_weights=(0.8, 0.2)))
    torch.testing.assert_close(mixed.losses, 0.8 * parts["sigmoid"] + 0.2 * parts["bco_pair"])
    torch.testing.assert_close(mixed.chosen_rewards, losses(LossConfig("sigmoid", 0.2)).chosen_rewards)
    # weights default to 1; a smoothed and an unsmoothed loss share eps; a length-averaged one gets the counts
    mixed = losses(LossConfig("exo_pair, ipo", 0.2, 0.05, sft_weight=0.5))
    nll = 0.5 * (-pc.detach() / cc)
    torch.testing.assert_close(mixed.losses, parts["exo_pair"] + parts["ipo"] + nll)



def test_wpo_pair_weights_scale_the_preference_loss_only():
    pc, pr, rc, rr, cc, cr = random_batch(seed=13)
    weights = torch.rand(len(pc), generator=torch.Generator().manual_seed(0))
    plain = preference_loss(pc, pr, rc, rr, LossConfig("sigmoid,apo_down", 0.1, sft_weight=0.3),
                            chosen_token_counts=cc).losses
    weighted = preference_loss(pc, pr, rc, rr, LossConfig("sigmoid,apo_down", 0.1, sft_weight=0.3, use_weighting=True),
                               chosen_token_counts=cc, pair_weights=weights.requires_grad_())
    nll = 0.3 * (-pc / cc)
    torch.testing.assert_close(weighted.losses, (plain - nll) * weights + nll)
    weighted.losses.sum().backward()
    assert weights.grad is None  # the weights are constants, as in WPO
    with pytest.raises(ValueError, match="pair_weights"):
        one_pair(LossConfig(use_weighting=True))


def test_unlikelihood_value():
    # chosen tokens p = 0.5, 0.25: -log 0.5 - log 0.25 = log 8; rejected p = 0.5, 0.9: -log(0.5) - log(0.1) = log 20
    chosen = torch.log(torch.tensor([0.5, 0.25]))
    rejected = torch.log(torch.tensor([0.5, 0.9]))
    assert unlikelihood_loss(chosen, rejected).item() == pytest.approx(math.log(8) + math.log(20), rel=1e-5)
    assert unlikelihood_loss(chosen, rejected, alpha=0.5).item() == pytest.approx(math.log(8) + 0.5 * math.log(20),
                                                                                   rel=1e-5)


def test_unlikelihood_of_a_certain_token_is_large_but_finite_and_so_is_its_gradient():
    rejected = torch.zeros(1, requires_grad=True)  # p = 1: 1 - p is floored at 1e-5
    loss = unlikelihood_loss(torch.zeros(0), rejected)
    assert loss.item() == pytest.approx(-math.log(1e-5), rel=1e-3)
    loss.backward()
    assert torch.isfinite(rejected.grad).all()
