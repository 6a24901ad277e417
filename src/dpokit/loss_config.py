"""Which preference loss to use and its hyper-parameters: the checks of LossConfig, without torch.

Kept apart from dpokit.losses (which needs torch) so that a config is validated in a fraction of a second,
before any model or tensor library is loaded; dpokit.losses re-exports both names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dpokit.errors import ConfigError

# TRL's loss_type names, so that a TRL config carries over.
LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "sigmoid_norm", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
              "apo_zero", "apo_down", "simpo", "orpo")
REFERENCE_FREE_LOSSES = ("simpo", "orpo")  # defined without a reference model: none is loaded for them
SIMPO_GAMMA_DEFAULT = 0.5  # TRL's CPOConfig.simpo_gamma

# Which losses take which option; every other combination is an error (see LossConfig.__post_init__).
SMOOTHED_LOSSES = ("sigmoid", "robust", "exo_pair", "simpo")  # --label-smoothing
NO_SFT_TERM_LOSSES = ("orpo",)  # already contain the chosen NLL: --sft-weight would count it twice


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(frozen=True)
class LossConfig:
    """Which preference loss to use and its hyper-parameters (validated on construction).

    ``beta`` is the loss's temperature (for ``orpo`` it is the odds-ratio weight lambda, TRL's name ``beta``).
    ``label_smoothing`` is the assumed label-flip rate eps in [0, 0.5); only the losses in
    ``SMOOTHED_LOSSES`` take it, and ``exo_pair`` requires it > 0.
    ``sft_weight`` adds ``sft_weight * (-policy_chosen / chosen_token_counts)`` (the chosen
    response's mean per-token NLL) to every per-pair loss; ``orpo`` has that term built in.
    ``simpo_gamma`` is SimPO's target reward margin (``simpo`` only; None means 0.5).
    ``simpo`` and ``orpo`` never use a reference: ``reference_free`` is set to True for them.
    """

    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    reference_free: bool = False
    sft_weight: float = 0.0
    simpo_gamma: float | None = None

    def __post_init__(self) -> None:
        loss = self.loss_type
        if loss not in LOSS_TYPES:
            raise ConfigError(f"unknown loss_type {loss!r} (--loss); expected one of {', '.join(LOSS_TYPES)}")
        if not _is_number(self.beta) or not math.isfinite(self.beta) or self.beta <= 0:
            raise ConfigError(f"beta must be a finite number > 0, got {self.beta!r}")
        ls = self.label_smoothing
        if not _is_number(ls) or not 0.0 <= ls < 0.5:
            raise ConfigError(f"label_smoothing must be a number in [0, 0.5), got {ls!r}")
        if ls > 0 and loss not in SMOOTHED_LOSSES:
            raise ConfigError(f"label_smoothing (--label-smoothing) {ls} is only supported with loss "
                              f"{', '.join(SMOOTHED_LOSSES)}, not {loss!r}")
        if loss == "exo_pair" and ls == 0:
            raise ConfigError("loss 'exo_pair' needs label_smoothing (--label-smoothing) > 0 (the EXO paper "
                              "suggests 1e-3)")
        sw = self.sft_weight
        if not _is_number(sw) or not math.isfinite(sw) or sw < 0:
            raise ConfigError(f"sft_weight must be a finite number >= 0, got {sw!r}")
        if sw > 0 and loss in NO_SFT_TERM_LOSSES:
            raise ConfigError(f"sft_weight (--sft-weight) is not supported with loss {loss!r}: it already "
                              "contains the chosen response's NLL (weight 1; --beta weighs its odds-ratio term)")
        gamma = self.simpo_gamma
        if gamma is not None:
            if loss != "simpo":
                raise ConfigError(f"simpo_gamma (--simpo-gamma) applies to loss 'simpo' only, not {loss!r}")
            if not _is_number(gamma) or not math.isfinite(gamma):
                raise ConfigError(f"simpo_gamma must be a finite number, got {gamma!r}")
        if not isinstance(self.reference_free, bool):
            raise ConfigError(f"reference_free must be true or false, got {self.reference_free!r}")
        if loss in REFERENCE_FREE_LOSSES:
            object.__setattr__(self, "reference_free", True)  # frozen: the one normalisation

    @property
    def gamma(self) -> float:
        """SimPO's target margin in effect (``simpo_gamma`` or its default)."""
        return SIMPO_GAMMA_DEFAULT if self.simpo_gamma is None else self.simpo_gamma
