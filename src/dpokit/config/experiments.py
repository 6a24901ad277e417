"""The options of the experiment commands, each declared once (dpokit.config.options): `dpokit demo`
(:class:`DemoConfig`), `dpokit iterate` (:class:`IterateConfig`, whose rounds share :class:`RoundSettings`),
and `dpokit reproduce` (:class:`ReproduceConfig`); `dpokit winrate`'s are in dpokit.config.winrate.

The demo runs one round of iterative DPO, so the settings it shares with `dpokit iterate` (labelling, the DPO step,
sampling, and the judge, seed and threads) are pieces both compose: each default is written once.

Standard library only (and dpokit.config.options): the command line lists and checks these without torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dpokit.config.options import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, Range, check_options, opt, positional
from dpokit.errors import ConfigError

# Round r (1-based) seeds its sampling, labelling and training with seed + ROUND_SEED_STRIDE·(r − 1): round 1 uses
# the seed itself, as `dpokit demo` always has, and later rounds draw fresh samples.
ROUND_SEED_STRIDE = 1000
REFERENCES = ("fixed", "previous")
LABELINGS = ("argmax", "bradley-terry")
METHODS = ("dpo", "dpo-online", "dpo-online-gt", "ppo", "ppo-gt", "preferred-ft", "unlikelihood", "best-of-n")  # `dpokit reproduce sentiment`'s
SWEEPS = ("full", "quick", "tiny")  # the sizes of its sweep (dpokit.experiments.paper.task.SIZES)

PAIRS = Range(2, words="be at least 2 to form pairs")
AUTO_THREADS = Range(0, words="be at least 1 (0: automatic)")
SAMPLED = Range(0, low_open=True, words="be positive (pairs need samples, not greedy decoding)")
OPEN_FRACTION = Range(0, 1, low_open=True, high_open=True)  # (0, 1)


def round_seed(seed: int, round_number: int) -> int:
    """The seed of round `round_number` (1-based) of a run seeded with `seed`."""
    return seed + ROUND_SEED_STRIDE * (round_number - 1)


@dataclass(frozen=True)
class ExperimentOptions:
    """What every experiment on a judge takes: the judge, the seed and the CPU threads."""

    judge: str = opt("vader", "judge: vader, module.path:function (text -> float), classifier:PATH:LABEL, "
                     "reward:PATH, implicit:POLICY:REF[:BETA] (any spec dpokit.judges.loader.load_judge takes)")
    seed: int = opt(0, "random seed of every stage (round r of `dpokit iterate` samples with seed + 1000·(r-1))")
    threads: int = opt(0, "torch CPU threads (0: chosen from the model's width and the free CPUs)",
                       range=AUTO_THREADS)


@dataclass(frozen=True)
class RoundOptions:
    """The settings of a round (sample, label, DPO, evaluate) that `dpokit demo` and `dpokit iterate` share."""

    labeling: str = opt("argmax", "argmax: the higher judge score is chosen; bradley-terry: sampled with "
                        "P = σ(scale·Δscore)", choices=LABELINGS)
    min_score_gap: float = opt(0.1, "pairs whose judge scores differ by less than this are ties: no pair",
                               range=NON_NEGATIVE)
    bt_scale: float = opt(10.0, "score scale of the Bradley-Terry labeling", range=POSITIVE)
    beta: float = opt(0.1, "DPO β", range=POSITIVE)
    lr: float = opt(1e-4, "DPO learning rate (AdamW)", range=POSITIVE)
    batch_size: int = opt(16, "pairs (in the demo's SFT: reviews) per optimizer step", range=AT_LEAST_ONE)
    eval_samples: int = opt(2, "continuations per held-out prompt for the judge scores and KL", range=AT_LEAST_ONE)
    max_new_tokens: int = opt(32, "tokens per sampled continuation", range=AT_LEAST_ONE)
    temperature: float = opt(1.0, "sampling temperature (> 0: exact samples, no top-k/top-p)", range=SAMPLED)


@dataclass(frozen=True)
class RoundSettings(RoundOptions):
    """Everything one round (dpokit.experiments.iterate) needs besides its models, prompts and judge."""

    samples_per_prompt: int = opt(4, "continuations sampled per training prompt each round (K; up to K(K-1)/2 "
                                  "pairs)", range=PAIRS)
    steps: int = opt(50, "DPO optimizer steps per round", range=AT_LEAST_ONE)
    warmup_steps: int = opt(10, "linear warm-up steps of each round's DPO", range=NON_NEGATIVE)
    max_length: int = opt(256, "maximum prompt + response tokens in training (at most the model's positions)",
                          range=AT_LEAST_ONE)
    max_prompt_length: int = opt(192, "prompt tokens kept when prompt + response is too long", range=AT_LEAST_ONE)

    def __post_init__(self) -> None:
        check_options(self)


def _shared(config: RoundOptions) -> dict:
    """The values of `config`'s :class:`RoundOptions` fields."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(RoundOptions)}


@dataclass(frozen=True)
class DemoOptions:
    """The demo's own sizes: its SFT step, prompts, DPO steps and held-out evaluation."""

    output: str = opt("runs/demo", "output directory: report.json, plots, the SFT and DPO models")
    model: str | None = opt(None, "base model to start from (default: the embedded tiny review model)")
    sft_reviews: int = opt(2000, "generated reviews for the SFT step", range=AT_LEAST_ONE)
    sft_steps: int = opt(60, "SFT optimizer steps", range=AT_LEAST_ONE)
    sft_lr: float = opt(3e-4, "SFT learning rate (AdamW)", range=POSITIVE)
    prompts: int = opt(256, "training prompts P (review openings of 2-8 tokens)", range=AT_LEAST_ONE)
    completions: int = opt(RoundSettings.samples_per_prompt, "continuations sampled per prompt (4 gives up to 6 "
                           "pairs)", range=PAIRS)
    dpo_steps: int = opt(150, "DPO optimizer steps", range=AT_LEAST_ONE)
    eval_prompts: int = opt(128, "held-out prompts, never used in training", range=AT_LEAST_ONE)
    examples_shown: int = opt(5, "held-out examples printed side by side", range=NON_NEGATIVE)


@dataclass(frozen=True)
class DemoConfig(RoundOptions, DemoOptions, ExperimentOptions):
    """Every size and setting of `dpokit demo`; each is a flag (and a key of its ``--config`` YAML)."""

    def __post_init__(self) -> None:
        check_options(self)

    def round_settings(self) -> RoundSettings:
        """The demo's one round of iterative DPO (dpokit.experiments.iterate): its sampling, labelling and DPO
        settings."""
        return RoundSettings(samples_per_prompt=self.completions, steps=self.dpo_steps, warmup_steps=10,
                             max_length=128, max_prompt_length=16, **_shared(self))


@dataclass(frozen=True)
class IterateOptions:
    """The run of `dpokit iterate`: its prompts, output, starting policy, rounds and reference."""

    prompts: str = opt(None, "training prompts: FILE.jsonl (JSON strings, message lists or {\"prompt\"|\"messages\": "
                       "...} objects) or one plain-text prompt per line", required=True, metavar="FILE")
    output: str = opt("runs/iterate", "output directory: round-NNN/{pairs.jsonl, model/, metrics.json}, "
                      "summary.json, judge_scores.png")
    model: str | None = opt(None, "starting policy: model directory, adapter directory or hub name (default: the "
                            "embedded tiny review model; usually an SFT model)")
    eval_prompts: str | None = opt(None, "held-out prompts file (same formats as --prompts); default: "
                                   "--eval-fraction of --prompts")
    eval_fraction: float = opt(0.1, "share of --prompts held out for evaluation when --eval-prompts is not given "
                               "(seeded)", range=OPEN_FRACTION)
    rounds: int = opt(3, "rounds of sample -> label -> DPO -> evaluate", range=AT_LEAST_ONE)
    reference: str = opt("fixed", "DPO reference of each round: fixed (the starting model) or previous (the "
                         "round's starting policy)", choices=REFERENCES)
    resume: bool = opt(False, "continue the run in --output: complete rounds are kept, an interrupted one is redone")
    overwrite: bool = opt(False, "replace the run in --output")


@dataclass(frozen=True)
class IterateConfig(RoundSettings, IterateOptions, ExperimentOptions):
    """Every setting of `dpokit iterate`; each is a flag. The settings every round shares (and their defaults) are
    inherited from :class:`RoundSettings`, so each is written once."""

    def __post_init__(self) -> None:
        check_options(self)
        if self.resume and self.overwrite:
            raise ConfigError("--resume continues the run in --output and --overwrite replaces it: give one")

    def round_settings(self) -> RoundSettings:
        """The settings every round of this run shares."""
        return RoundSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(RoundSettings)})

    def run_identity(self) -> dict:
        """The settings a resumed run must share with the run it continues (all but the number of rounds, the
        threads and how the output directory is claimed)."""
        skip = {"rounds", "threads", "resume", "overwrite", "output"}
        return {k: v for k, v in self.__dict__.items() if k not in skip}


@dataclass(frozen=True)
class ReproduceConfig:
    """Every option of `dpokit reproduce`: the experiment (positional), its sweep and where it goes."""

    experiment: str = positional(opt(None, "sentiment: §6.1's reward-KL frontier of DPO, PPO, PPO-GT, Preferred-FT, "
                                     "Unlikelihood and Best-of-N on the embedded review model; dpo-vs-ppo: the study of "
                                     "why DPO does not dominate PPO there (online DPO, data budgets, seeds, β against "
                                     "the optimum, verdicts from bootstrap intervals)",
                                     choices=("sentiment", "dpo-vs-ppo"), required=True))
    output: str = opt(None, "directory for frontier.json, frontier.png, report.md and the trained models",
                      required=True)
    quick: bool = opt(False, "the reduced sweep (same as --sizes quick)")
    sizes: str = opt("full", "full: every knob value of the paper's sweep; quick: about 10 minutes on 2 CPU cores; "
                     "tiny: seconds, to check the pipeline (meaningless numbers)", choices=SWEEPS)
    methods: str = opt(",".join(METHODS), "comma-separated methods to run")
    overwrite: bool = opt(False, "replace what --output holds (without it, a directory that holds anything is refused)")
    seed: int = opt(0, "random seed of every stage")
    threads: int | None = opt(None, "torch CPU threads (default: chosen from the model's width and the free CPUs)",
                              range=AT_LEAST_ONE)

    def __post_init__(self) -> None:
        check_options(self)
        self.method_list()
        if self.quick and self.sizes not in ("full", "quick"):
            raise ConfigError(f"--quick and --sizes {self.sizes} contradict each other: give one")
        if self.experiment == "dpo-vs-ppo" and self.methods != ",".join(METHODS):
            raise ConfigError("--methods applies to `reproduce sentiment`; the dpo-vs-ppo study runs its own set")

    def method_list(self) -> tuple[str, ...]:
        """The methods of ``--methods``, each one of :data:`METHODS`."""
        methods = tuple(m.strip() for m in self.methods.split(",") if m.strip())
        unknown = [m for m in methods if m not in METHODS]
        if unknown or not methods:
            raise ConfigError(f"--methods: unknown {', '.join(unknown) or '(none given)'}; "
                              f"choose from {', '.join(METHODS)}")
        return methods

    def sweep(self) -> str:
        """The name of the sweep's sizes: ``quick`` with ``--quick``, else ``--sizes``."""
        return "quick" if self.quick else self.sizes
