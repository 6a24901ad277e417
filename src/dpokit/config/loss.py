"""Which preference loss to use and its hyper-parameters: the options (LossOptions) and the validated LossConfig
the loss functions take, without torch, so that a config is checked before any model or tensor library is loaded."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from dpokit.config.options import DPO, defaults_of, options_of, opt
from dpokit.errors import ConfigError

# TRL's loss_type names, so that a TRL config carries over (dpop is not in TRL).
LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "sigmoid_norm", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
              "apo_zero", "apo_down", "dpop", "simpo", "orpo", "kto")
REFERENCE_FREE_LOSSES = ("simpo", "orpo")  # defined without a reference model: none is loaded for them
UNPAIRED_LOSSES = ("kto",)  # trained on unpaired data (prompt, completion, label), not on preference pairs
SIMPO_GAMMA_DEFAULT = 0.5  # TRL's CPOConfig.simpo_gamma
DPOP_LAMBDA_DEFAULT = 50.0  # the Smaug paper's value

# Which losses take which option; every other combination is an error (see LossConfig.__post_init__).
SMOOTHED_LOSSES = ("sigmoid", "robust", "exo_pair", "simpo")  # --label-smoothing
NO_SFT_TERM_LOSSES = ("orpo",)  # already contain the chosen NLL: --sft-weight would count it twice


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _finite(x: object) -> bool:
    return _is_number(x) and math.isfinite(x)


@dataclass
class LossOptions:
    """The preference loss and its hyper-parameters as options (flags, YAML keys); `loss_config()` is the
    LossConfig the loss functions take, whose checks (which loss takes which option, and the ranges) are the
    options' checks."""

    loss: str = opt("sigmoid", f"preference loss: one of {', '.join(LOSS_TYPES)}, or several comma-separated "
                    "(weighted by --loss-weights); README: Losses", stages=DPO, aliases=("--loss-type",))
    loss_weights: str | None = opt(None, "comma-separated weight of each loss given to --loss (default: 1 each)", stages=DPO)
    beta: float = opt(0.1, "β: strength of the KL constraint to the reference (SimPO's paper uses 2-2.5; for orpo "
                      "it is ORPO's λ, the odds-ratio weight, as in TRL)", stages=DPO)
    label_smoothing: float = opt(0.0, "assumed label-noise rate ε (conservative DPO for sigmoid; robust)", stages=DPO)
    sft_weight: float = opt(0.0, "weight of an NLL term on chosen responses added to the preference loss", stages=DPO)
    reference_free: bool = opt(False, "drop the reference model (its log-probs are taken as 0); implied by the "
                               "reference-free losses simpo and orpo", stages=DPO)
    simpo_gamma: float | None = opt(None, "SimPO's target reward margin γ (--loss simpo only; default 0.5, TRL's)", stages=DPO)
    dpop_lambda: float | None = opt(None, "DPO-Positive's penalty weight λ (--loss dpop only; default 50)", stages=DPO)
    ld_alpha: float | None = opt(None, "LD-DPO length desensitisation α in [0, 1]: response tokens beyond the shorter "
                                 "response of the pair count α times in policy and reference log-probs", stages=DPO)
    use_weighting: bool = opt(False, "WPO: weight each pair's loss by the policy's probability weights of its two "
                              "responses (one extra forward pass without gradients per batch)", stages=DPO)
    desirable_weight: float | None = opt(None, "KTO: weight of the desirable examples' losses (--loss kto only; "
                                         "default 1)", stages=DPO)
    undesirable_weight: float | None = opt(None, "KTO: weight of the undesirable examples' losses (--loss kto "
                                           "only; default 1)", stages=DPO)
    average_logps: bool = opt(False, "average response log-probs over tokens instead of summing them", stages=DPO)

    def loss_config(self) -> LossConfig:
        """The validated LossConfig of these options (the fields both share, by name; --loss is its loss_type)."""
        shared = {f.name for f in dataclasses.fields(LossConfig)} & {f.name for f in options_of(LossOptions)}
        values = {name: getattr(self, name) for name in shared - {"loss_weights"}}
        return LossConfig(loss_type=self.loss, loss_weights=parse_loss_weights(self.loss_weights), **values)


_DEFAULTS = defaults_of(LossOptions)


@dataclass(frozen=True)
class LossConfig:
    """Which preference loss to use and its hyper-parameters (validated on construction).

    ``loss_type`` is one name of ``LOSS_TYPES`` or several, comma-separated (``"sigmoid,bco_pair"``): the loss is
    then ``sum_k loss_weights[k] * loss_k`` (weights default to 1 each), as TRL's ``loss_type`` list and
    ``loss_weights``. ``simpo`` and ``orpo`` cannot be mixed (they use no reference; the others do).
    ``beta`` is the loss's temperature (for ``orpo`` it is the odds-ratio weight lambda, TRL's name ``beta``).
    ``label_smoothing`` is the assumed label-flip rate eps in [0, 0.5); only the losses in
    ``SMOOTHED_LOSSES`` take it (in a mixture, each of those uses it), and ``exo_pair`` requires it > 0.
    ``sft_weight`` adds ``sft_weight * (-policy_chosen / chosen_token_counts)`` (the chosen
    response's mean per-token NLL) to every per-pair loss; ``orpo`` has that term built in.
    ``simpo_gamma`` is SimPO's target reward margin (``simpo`` only; None means 0.5); ``dpop_lambda`` DPO-Positive's
    penalty weight (``dpop`` only; None means 50).
    ``ld_alpha`` in [0, 1] turns on LD-DPO's length desensitisation (TRL's ``ld_alpha``): the tokens of a response
    beyond the shorter response of its pair count ``ld_alpha`` times in its log-prob, for policy and reference
    alike (losses with a reference; not with ``sft_weight``, whose NLL would then be weighted too).
    ``use_weighting`` turns on WPO's weighting (TRL's ``use_weighting``): each pair's preference loss is multiplied
    by the policy's (detached) probability weights of its two responses (losses with a reference).
    ``simpo`` and ``orpo`` never use a reference: ``reference_free`` is set to True for them.
    ``kto`` (unpaired data) cannot be mixed and takes none of the pair options above; ``desirable_weight`` and
    ``undesirable_weight`` (None: 1) weigh its desirable and undesirable examples' losses (``kto`` only).
    """

    loss_type: str = _DEFAULTS["loss"]
    beta: float = _DEFAULTS["beta"]
    label_smoothing: float = _DEFAULTS["label_smoothing"]
    reference_free: bool = _DEFAULTS["reference_free"]
    sft_weight: float = _DEFAULTS["sft_weight"]
    simpo_gamma: float | None = _DEFAULTS["simpo_gamma"]
    loss_weights: tuple[float, ...] | None = None
    dpop_lambda: float | None = _DEFAULTS["dpop_lambda"]
    ld_alpha: float | None = _DEFAULTS["ld_alpha"]
    use_weighting: bool = _DEFAULTS["use_weighting"]
    desirable_weight: float | None = _DEFAULTS["desirable_weight"]
    undesirable_weight: float | None = _DEFAULTS["undesirable_weight"]

    def __post_init__(self) -> None:
        names = self._check_names()
        loss = self.loss_type
        self._check_unpaired(names)
        if not _finite(self.beta) or self.beta <= 0:
            raise ConfigError(f"beta must be a finite number > 0, got {self.beta!r}")
        ls = self.label_smoothing
        if not _is_number(ls) or not 0.0 <= ls < 0.5:
            raise ConfigError(f"label_smoothing must be a number in [0, 0.5), got {ls!r}")
        if ls > 0 and not set(names) & set(SMOOTHED_LOSSES):
            raise ConfigError(f"label_smoothing (--label-smoothing) {ls} is only supported with loss "
                              f"{', '.join(SMOOTHED_LOSSES)}, not {loss!r}")
        if "exo_pair" in names and ls == 0:
            raise ConfigError("loss 'exo_pair' needs label_smoothing (--label-smoothing) > 0 (the EXO paper "
                              "suggests 1e-3)")
        sw = self.sft_weight
        if not _finite(sw) or sw < 0:
            raise ConfigError(f"sft_weight must be a finite number >= 0, got {sw!r}")
        if sw > 0 and loss in NO_SFT_TERM_LOSSES:
            raise ConfigError(f"sft_weight (--sft-weight) is not supported with loss {loss!r}: it already "
                              "contains the chosen response's NLL (weight 1; --beta weighs its odds-ratio term)")
        for option, owner in (("simpo_gamma", "simpo"), ("dpop_lambda", "dpop")):
            value = getattr(self, option)
            if value is None:
                continue
            if owner not in names:
                raise ConfigError(f"{option} (--{option.replace('_', '-')}) applies to loss {owner!r} only, "
                                  f"not {loss!r}")
            if not _finite(value) or (option == "dpop_lambda" and value < 0):
                raise ConfigError(f"{option} must be a finite number{' >= 0' if option == 'dpop_lambda' else ''}, "
                                  f"got {value!r}")
        alpha = self.ld_alpha
        if alpha is not None:
            if not _is_number(alpha) or not 0.0 <= alpha <= 1.0:
                raise ConfigError(f"ld_alpha must be a number in [0, 1], got {alpha!r}")
            if loss in REFERENCE_FREE_LOSSES:
                raise ConfigError(f"ld_alpha (--ld-alpha) applies to the losses with a reference, not {loss!r}")
            if sw > 0:
                raise ConfigError("ld_alpha (--ld-alpha) with sft_weight (--sft-weight) is not supported: the NLL "
                                  "term would be computed on the desensitised log-probs")
        if not isinstance(self.use_weighting, bool):
            raise ConfigError(f"use_weighting must be true or false, got {self.use_weighting!r}")
        if self.use_weighting and loss in REFERENCE_FREE_LOSSES:
            raise ConfigError(f"use_weighting (--use-weighting) applies to the losses with a reference, not {loss!r}")
        if not isinstance(self.reference_free, bool):
            raise ConfigError(f"reference_free must be true or false, got {self.reference_free!r}")
        if loss in REFERENCE_FREE_LOSSES:
            object.__setattr__(self, "reference_free", True)  # frozen: the normalisations are set here

    def _check_unpaired(self, names: tuple[str, ...]) -> None:
        """KTO's options: its two weights; none of the pair losses' options."""
        for option in ("desirable_weight", "undesirable_weight"):
            value = getattr(self, option)
            if value is None:
                continue
            if "kto" not in names:
                raise ConfigError(f"{option} (--{option.replace('_', '-')}) applies to loss 'kto' only, "
                                  f"not {self.loss_type!r}")
            if not _finite(value) or value < 0:
                raise ConfigError(f"{option} must be a finite number >= 0, got {value!r}")
        if "kto" not in names:
            return
        for option, given in (("sft_weight", self.sft_weight != 0), ("ld_alpha", self.ld_alpha is not None),
                              ("use_weighting", self.use_weighting is True),
                              ("reference_free", self.reference_free is True)):
            if given:
                raise ConfigError(f"{option} (--{option.replace('_', '-')}) is not supported with loss 'kto'")

    def _check_names(self) -> tuple[str, ...]:
        if not isinstance(self.loss_type, str):
            raise ConfigError(f"--loss must be a loss name (or several, comma-separated); got {self.loss_type!r}")
        names = tuple(name.strip() for name in self.loss_type.split(","))
        for name in names:
            if name not in LOSS_TYPES:
                raise ConfigError(f"--loss must be one of {', '.join(LOSS_TYPES)} (or several, comma-separated); "
                                  f"got {name!r}")
        if len(set(names)) < len(names):
            raise ConfigError(f"--loss names a loss twice: {self.loss_type!r}")
        if len(names) > 1 and set(names) & set(UNPAIRED_LOSSES):
            raise ConfigError(f"--loss {self.loss_type}: kto is trained on unpaired data and cannot be mixed with "
                              "the pair losses")
        if len(names) > 1 and set(names) & set(REFERENCE_FREE_LOSSES):
            raise ConfigError(f"--loss {self.loss_type}: simpo and orpo use no reference and cannot be mixed with "
                              "other losses")
        object.__setattr__(self, "loss_type", ",".join(names))
        weights = self.loss_weights
        if weights is not None:
            if not isinstance(weights, tuple) or not all(_finite(w) and w > 0 for w in weights):
                raise ConfigError(f"loss_weights (--loss-weights) must be numbers > 0; got {weights!r}")
            if len(weights) != len(names):
                raise ConfigError(f"--loss-weights has {len(weights)} weight(s) for {len(names)} loss(es) "
                                  f"(--loss {self.loss_type})")
        return names

    @property
    def loss_types(self) -> tuple[str, ...]:
        """The losses mixed (one for a single loss)."""
        return tuple(self.loss_type.split(","))

    @property
    def weights(self) -> tuple[float, ...]:
        """The weight of each loss of ``loss_types`` (1 each unless ``loss_weights`` is given)."""
        return self.loss_weights or (1.0,) * len(self.loss_types)

    @property
    def gamma(self) -> float:
        """SimPO's target margin in effect (``simpo_gamma`` or its default)."""
        return SIMPO_GAMMA_DEFAULT if self.simpo_gamma is None else self.simpo_gamma

    @property
    def unpaired(self) -> bool:
        """Whether the loss is trained on unpaired data (prompt, completion, label): ``kto``."""
        return self.loss_type in UNPAIRED_LOSSES

    @property
    def kto_weights(self) -> tuple[float, float]:
        """KTO's (desirable, undesirable) weights in effect (1 each unless given)."""
        return (1.0 if self.desirable_weight is None else self.desirable_weight,
                1.0 if self.undesirable_weight is None else self.undesirable_weight)

    @property
    def dpop_penalty(self) -> float:
        """DPO-Positive's lambda in effect (``dpop_lambda`` or its default)."""
        return DPOP_LAMBDA_DEFAULT if self.dpop_lambda is None else self.dpop_lambda


def parse_loss_weights(text: str | None) -> tuple[float, ...] | None:
    """``"0.8,0.2"`` -> ``(0.8, 0.2)``; a one-line ConfigError naming --loss-weights for anything else."""
    if text is None:
        return None
    try:
        return tuple(float(part) for part in str(text).split(","))
    except ValueError:
        raise ConfigError(f"--loss-weights must be comma-separated numbers; got {text!r}") from None
