"""The options of `dpokit winrate`, each declared once (dpokit.config.options): :class:`WinrateConfig`.

Standard library only (and dpokit.config.options): the command line lists and checks these without torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dpokit.config.experiments import OPEN_FRACTION
from dpokit.config.options import AT_LEAST_ONE, NON_NEGATIVE, OPEN_UNIT, check_options, opt
from dpokit.errors import ConfigError

DEFAULT_TEMPERATURE = 1.0  # without --temperature or --temperatures

JUDGE_HELP = ("pairwise judge: llm:PATH (a local instruction-tuned LM asked which response is better, read from "
              "its next-token probabilities of 'A' and 'B'), or a pointwise judge made pairwise (higher score wins, "
              "equal scores tie): vader, module.path:function, classifier:PATH:LABEL, reward:PATH, "
              "implicit:POLICY:REF[:BETA]")


def parse_temperatures(text: str) -> list[float]:
    """``0.25,0.5,1`` as a list of temperatures (each finite and >= 0, no repeats)."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--temperatures must be comma-separated numbers, got {text!r}") from None
    if not values or not all(math.isfinite(v) and v >= 0 for v in values) or len(set(values)) != len(values):
        raise ConfigError(f"--temperatures needs distinct numbers >= 0, got {text!r}")
    return values


@dataclass(frozen=True)
class WinrateConfig:
    """Every option of `dpokit winrate`; ``--temperature`` and ``--temperatures`` exclude each other."""

    model: str = opt(None, "the model compared: model or LoRA adapter directory, or hub name", required=True)
    baseline: str = opt(None, "the model it is compared with (same tokenizer)", required=True)
    prompts: str = opt(None, "prompts, as dpokit generate reads them (FILE.jsonl: JSON strings, message lists or "
                       "{\"prompt\"|\"messages\": ...} objects; any other file: one plain-text prompt per line)",
                       required=True, metavar="FILE")
    judge: str = opt(None, JUDGE_HELP, required=True)
    temperature: float | None = opt(None, f"sampling temperature (0 = greedy; default: {DEFAULT_TEMPERATURE})",
                                    range=NON_NEGATIVE, exclusive="temperature")
    temperatures: str | None = opt(None, "several temperatures (e.g. 0.25,0.5,0.75,1.0): a win rate at each, and a "
                                   "plot winrate.png in --output", metavar="T1,T2,...", exclusive="temperature")
    json: bool = opt(False, "print one JSON object (a list of them with --temperatures) and nothing else on stdout")
    output: str | None = opt(None, "write winrate.jsonl (per-prompt records) and winrate.png here", metavar="DIR")
    judge_template: str | None = opt(None, "the llm: judge's question, with {prompt}, {response_a}, {response_b} "
                                     "(default below)", metavar="FILE")
    both_orders: bool = opt(True, "ask the llm: judge with the responses in both orders and average (cancels a "
                            "judge's position bias; twice the judge's work)")
    on_judge_error: str = opt("stop", "a prompt the judge fails on (error or NaN): stop, naming the prompts, or "
                              "leave it out (counted as skipped)", choices=("stop", "skip"))
    system: str | None = opt(None, "a system message put before each prompt that has none (chat models)")
    chat_template: bool | None = opt(None, "render prompts with the models' chat template (default: when they have "
                                     "one)")
    max_new_tokens: int = opt(64, "tokens per response", range=AT_LEAST_ONE)
    top_p: float = opt(1.0, "nucleus sampling threshold", range=OPEN_UNIT)
    batch_size: int = opt(16, "prompts sampled together", range=AT_LEAST_ONE)
    judge_batch_size: int = opt(8, "pairs the llm: judge reads together", range=AT_LEAST_ONE)
    resamples: int = opt(2000, "bootstrap resamples of the confidence interval", range=AT_LEAST_ONE)
    confidence: float = opt(0.95, "confidence level of the interval", range=OPEN_FRACTION)
    seed: int = opt(0, "seed of the sampling (the baseline's: seed + 1), the order shown and the bootstrap")
    threads: int | None = opt(None, "torch CPU threads (default: chosen from the model's width and the free CPUs)",
                              range=AT_LEAST_ONE)

    def __post_init__(self) -> None:
        check_options(self)
        if self.temperatures:
            parse_temperatures(self.temperatures)
            if not self.output:
                raise ConfigError("--temperatures draws a plot: give --output DIR")

    def temperature_list(self) -> list[float]:
        """The temperatures to sample at: those of ``--temperatures``, else ``--temperature`` alone."""
        return parse_temperatures(self.temperatures) if self.temperatures else [DEFAULT_TEMPERATURE if self.temperature is None else self.temperature]
