"""The settings of `dpokit iterate` (iterative / online DPO) and of one round of it, apart from the rounds
themselves so that the command line can list and check them without loading torch.

:class:`RoundSettings` is what one round (sample, label, train, evaluate: dpokit.experiments.iterate) needs; `dpokit demo`
runs one round with its own settings, `dpokit iterate` runs several with :class:`IterateConfig`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

from dpokit.errors import ConfigError

# Round r (1-based) seeds its sampling, labelling and training with seed + ROUND_SEED_STRIDE·(r − 1): round 1 uses
# the seed itself, as `dpokit demo` always has, and later rounds draw fresh samples.
ROUND_SEED_STRIDE = 1000
REFERENCES = ("fixed", "previous")
LABELINGS = ("argmax", "bradley-terry")


@dataclass(frozen=True)
class RoundSettings:
    """Everything one round needs besides its models, prompts and judge."""

    samples_per_prompt: int = 4
    labeling: str = "argmax"
    min_score_gap: float = 0.1
    bt_scale: float = 10.0
    beta: float = 0.1
    lr: float = 1e-4
    steps: int = 50
    batch_size: int = 16
    warmup_steps: int = 10
    eval_samples: int = 2
    max_new_tokens: int = 32
    temperature: float = 1.0
    max_length: int = 256
    max_prompt_length: int = 192


def round_seed(seed: int, round_number: int) -> int:
    """The seed of round `round_number` (1-based) of a run seeded with `seed`."""
    return seed + ROUND_SEED_STRIDE * (round_number - 1)


@dataclass(frozen=True)
class IterateConfig(RoundSettings):
    """Every setting of `dpokit iterate`; each is a flag. The settings every round shares (and their defaults) are
    inherited from :class:`RoundSettings`, so each is written once; `dpokit iterate --help` lists them in the order
    of dpokit.cli.iterate.HELP."""

    prompts: str = ""  # required: the training prompts file (dpokit.data.prompts.read_prompts)
    output: str = "runs/iterate"
    model: str | None = None  # the starting policy; default: the embedded base model
    eval_prompts: str | None = None
    eval_fraction: float = 0.1
    rounds: int = 3
    judge: str = "vader"
    reference: str = "fixed"
    seed: int = 0
    threads: int = 0  # torch CPU threads; 0: dpokit.runtime.threads chooses
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ConfigError("--prompts FILE is required: the training prompts, one per line (or .jsonl)")
        if self.reference not in REFERENCES:
            raise ConfigError(f"--reference must be fixed or previous; got {self.reference!r}")
        if self.labeling not in LABELINGS:
            raise ConfigError(f"--labeling must be argmax or bradley-terry; got {self.labeling!r}")
        if self.samples_per_prompt < 2:
            raise ConfigError("--samples-per-prompt must be at least 2 to form pairs")
        if not 0 < self.eval_fraction < 1 and self.eval_prompts is None:
            raise ConfigError(f"--eval-fraction must be in (0, 1) (or give --eval-prompts); got {self.eval_fraction}")
        if self.threads < 0:
            raise ConfigError(f"--threads must be at least 1 (0: automatic); got {self.threads}")
        if self.resume and self.overwrite:
            raise ConfigError("--resume continues the run in --output and --overwrite replaces it: give one")
        for name in ("rounds", "steps", "batch_size", "eval_samples", "max_new_tokens", "max_length",
                     "max_prompt_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1; got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.min_score_gap < 0 or self.temperature <= 0 or self.beta <= 0:
            raise ConfigError("need --warmup-steps >= 0, --min-score-gap >= 0, --temperature > 0 (pairs need "
                              "samples, not greedy decoding) and --beta > 0")

    def round_settings(self) -> RoundSettings:
        """The settings every round of this run shares."""
        return RoundSettings(**{name: getattr(self, name) for name in RoundSettings.__dataclass_fields__})

    def run_identity(self) -> dict:
        """The settings a resumed run must share with the run it continues (all but the number of rounds, the
        threads and how the output directory is claimed)."""
        skip = {"rounds", "threads", "resume", "overwrite", "output"}
        return {k: v for k, v in self.__dict__.items() if k not in skip}
