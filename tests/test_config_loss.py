"""Tests for dpokit.config.loss: which loss takes which option, and the one-line errors otherwise."""

from __future__ import annotations

import pytest

from dpokit.errors import ConfigError
from dpokit.config.loss import LOSS_TYPES, LossConfig


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"loss_type": "dpo"}, "--loss must be one of .* got 'dpo'"),
        ({"beta": 0.0}, "beta must be"),
        ({"beta": -0.1}, "beta must be"),
        ({"beta": float("nan")}, "beta must be"),
        ({"beta": float("inf")}, "beta must be"),
        ({"beta": "0.1"}, "beta must be"),
        ({"label_smoothing": 0.5}, r"label_smoothing must be .*\[0, 0.5\)"),
        ({"label_smoothing": -0.01}, "label_smoothing must be"),
        ({"label_smoothing": float("nan")}, "label_smoothing must be"),
        ({"loss_type": "ipo", "label_smoothing": 0.1}, "only supported with"),
        ({"loss_type": "hinge", "label_smoothing": 0.1}, "only supported with"),
        ({"sft_weight": -1.0}, "sft_weight must be"),
        ({"sft_weight": float("nan")}, "sft_weight must be"),
        ({"reference_free": "yes"}, "reference_free"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LossConfig(**kwargs)


def test_config_defaults_and_valid():
    cfg = LossConfig()
    assert (cfg.loss_type, cfg.beta, cfg.label_smoothing, cfg.reference_free, cfg.sft_weight) == (
        "sigmoid",
        0.1,
        0.0,
        False,
        0.0,
    )
    for lt in LOSS_TYPES:
        LossConfig(lt, beta=1, label_smoothing=0.01 if lt == "exo_pair" else 0.0)  # int beta accepted
    LossConfig("robust", 0.1, label_smoothing=0.49)
    with pytest.raises(Exception):
        cfg.beta = 0.2  # frozen



@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"loss_type": "apo_zero", "label_smoothing": 0.1}, r"label_smoothing \(--label-smoothing\).*'apo_zero'"),
        ({"loss_type": "orpo", "label_smoothing": 0.1}, "only supported with"),
        ({"loss_type": "exo_pair"}, "'exo_pair' needs label_smoothing"),
        ({"loss_type": "orpo", "sft_weight": 0.5}, r"sft_weight \(--sft-weight\).*'orpo'"),
        ({"loss_type": "sigmoid", "simpo_gamma": 0.5}, r"simpo_gamma \(--simpo-gamma\).*'sigmoid'"),
        ({"loss_type": "simpo", "simpo_gamma": float("nan")}, "simpo_gamma must be"),
        ({"loss_type": "simpo", "simpo_gamma": "1"}, "simpo_gamma must be"),
    ],
)
def test_further_losses_config_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LossConfig(**kwargs)


def test_further_losses_accept_their_options():
    assert LossConfig("simpo").gamma == 0.5 and LossConfig("simpo", simpo_gamma=-0.2).gamma == -0.2
    LossConfig("simpo", 2.0, 0.1, sft_weight=0.5)  # CPO-SimPO: the NLL term on top
    LossConfig("exo_pair", 0.1, 1e-3, reference_free=True)
    assert not LossConfig("bco_pair").reference_free and LossConfig("orpo", reference_free=False).reference_free



def test_mixture_options():
    cfg = LossConfig(" sigmoid ,bco_pair", loss_weights=(0.8, 0.2))
    assert cfg.loss_type == "sigmoid,bco_pair" and cfg.loss_types == ("sigmoid", "bco_pair")
    assert cfg.weights == (0.8, 0.2) and LossConfig("hinge,ipo").weights == (1.0, 1.0)
    LossConfig("apo_zero,sigmoid", label_smoothing=0.1)  # sigmoid takes eps
    LossConfig("dpop,sigmoid", dpop_lambda=10.0)
    LossConfig("ipo,bco_pair", ld_alpha=0.0)
    LossConfig("sigmoid", ld_alpha=1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"loss_type": "sigmoid,bco_pair", "loss_weights": (1.0,)}, r"--loss-weights has 1 weight\(s\) for 2"),
        ({"loss_type": "sigmoid", "loss_weights": (1.0, 2.0)}, r"--loss-weights has 2 weight\(s\) for 1"),
        ({"loss_type": "sigmoid,bco_pair", "loss_weights": (1.0, -1.0)}, "must be numbers > 0"),
        ({"loss_type": "sigmoid,bco_pair", "loss_weights": (1.0, float("nan"))}, "must be numbers > 0"),
        ({"loss_type": "sigmoid,simpo"}, "cannot be mixed"),
        ({"loss_type": "sigmoid,sigmoid"}, "names a loss twice"),
        ({"loss_type": "sigmoid,"}, "got ''"),
        ({"loss_type": "hinge,apo_zero", "label_smoothing": 0.1}, "only supported with"),
        ({"loss_type": "sigmoid", "dpop_lambda": 1.0}, r"dpop_lambda \(--dpop-lambda\).*'sigmoid'"),
        ({"loss_type": "dpop", "dpop_lambda": -1.0}, "dpop_lambda must be"),
        ({"ld_alpha": 1.5}, r"ld_alpha must be a number in \[0, 1\]"),
        ({"ld_alpha": "0.5"}, "ld_alpha must be"),
        ({"loss_type": "simpo", "ld_alpha": 0.5}, r"ld_alpha \(--ld-alpha\).*'simpo'"),
        ({"ld_alpha": 0.5, "sft_weight": 0.1}, r"ld_alpha \(--ld-alpha\) with sft_weight"),
        ({"loss_type": "orpo", "use_weighting": True}, r"use_weighting \(--use-weighting\).*'orpo'"),
        ({"use_weighting": 1}, "use_weighting must be true or false"),
    ],
)
def test_mixture_and_dpop_config_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LossConfig(**kwargs)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(loss_type="kto,sigmoid"), "kto is trained on unpaired data and cannot be mixed"),
    (dict(loss_type="sigmoid", desirable_weight=2.0), "desirable_weight .* applies to loss 'kto' only"),
    (dict(loss_type="kto", undesirable_weight=-1.0), "undesirable_weight must be a finite number >= 0"),
    (dict(loss_type="kto", sft_weight=0.1), "sft_weight .* is not supported with loss 'kto'"),
    (dict(loss_type="kto", use_weighting=True), "use_weighting .* is not supported with loss 'kto'"),
    (dict(loss_type="kto", reference_free=True), "reference_free .* is not supported with loss 'kto'"),
    (dict(loss_type="kto", label_smoothing=0.1), "label_smoothing .* is only supported with loss"),
])
def test_kto_config_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LossConfig(**kwargs)


def test_kto_weights_default_to_one():
    assert LossConfig("kto").kto_weights == (1.0, 1.0) and LossConfig("kto").unpaired
    assert LossConfig("kto", desirable_weight=1.33, undesirable_weight=0.0).kto_weights == (1.33, 0.0)
    assert not LossConfig("sigmoid").unpaired
