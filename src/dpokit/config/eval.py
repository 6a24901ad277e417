"""The options of the commands that use a model without training it: `dpokit eval` (EvalConfig), `dpokit generate`
(GenerateConfig), `dpokit score` and `dpokit rank` (ScoreConfig, RankConfig: one ScoringOptions piece) and
`dpokit merge` (MergeConfig).

An option that means the same as a training option is that option (a shared piece, or :func:`same_as` its
declaration): one default, one rule. One whose meaning or allowed values differ here is declared here (eval's
--model is the policy evaluated, not the one trained; score's --dtype also takes float16).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dpokit.config.data import DataOptions, TokenizeOptions
from dpokit.config.loss import REFERENCE_FREE_LOSSES, LossOptions
from dpokit.config.model import ModelOptions
from dpokit.config.reward import is_reward_model_dir
from dpokit.config.options import (AT_LEAST_ONE, NON_NEGATIVE, OPEN_UNIT, POSITIVE, check_options, defaults_of, opt,
                                   same_as)
from dpokit.config.train import RuntimeOptions
from dpokit.errors import ConfigError

# the dtypes a model is loaded in for scoring or merging (no training: float16 is safe here)
LOAD_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class EvalConfig(LossOptions, TokenizeOptions):
    """Everything `dpokit eval` and :func:`dpokit.evaluate` take: the policy, its reference, the data, the loss
    (the options of `dpokit dpo`, LossOptions) and the tokenisation (TokenizeOptions)."""

    model: str = opt(None, "policy to evaluate: model directory, LoRA adapter directory or hub name", required=True)
    ref_model: str | None = opt(None, "reference model or adapter directory (required unless --reference-free or a "
                                "reference-free --loss)")
    data: str = opt(None, "preference data (any format dpokit dpo takes; unpaired data with --loss kto)",
                    required=True)
    format: str = same_as(DataOptions, "format")
    batch_size: int = opt(8, "examples per batch", range=AT_LEAST_ONE)
    dtype: str = same_as(ModelOptions, "dtype", help="model dtype")
    gguf_file: str | None = same_as(ModelOptions, "gguf_file", help="load --model from this GGUF file in the --model "
                                    "directory (dequantised)")
    layout: str = same_as(RuntimeOptions, "layout")
    attention: str = same_as(RuntimeOptions, "attention")
    threads: int | None = same_as(RuntimeOptions, "threads")
    json: bool = opt(False, "print one JSON object and nothing else")

    def __post_init__(self) -> None:
        check_options(self)
        self.check_lengths()
        self.loss = self.loss_config().loss_type  # the loss's own checks; "sigmoid, bco_pair" normalised
        if self.loss in REFERENCE_FREE_LOSSES:
            if self.ref_model is not None:
                raise ConfigError(f"--ref-model: loss {self.loss!r} is reference-free")
            self.reference_free = True
        if self.ref_model is None and not self.reference_free:
            raise ConfigError("evaluation needs --ref-model (or --reference-free)")


@dataclass
class GenerateConfig:
    """Everything `dpokit generate` takes; the sampling options' defaults are :func:`dpokit.generate`'s."""

    model: str = opt(None, "model directory, LoRA adapter directory or hub name", required=True)
    prompt: str | None = opt(None, 'one prompt: text, or a JSON list of messages (\'[{"role": "user", "content": '
                             '"hi"}]\')', exclusive="prompts", required=True)
    prompts: str | None = opt(None, "prompts: FILE.jsonl with one JSON string, message list or "
                              "{\"prompt\"|\"messages\": ...} object per line; any other file: one plain-text prompt "
                              "per line", exclusive="prompts", required=True, metavar="FILE")
    gguf_file: str | None = same_as(ModelOptions, "gguf_file", help="load --model from this GGUF file in the --model "
                                    "directory (dequantised)")
    image: list[str] | None = opt(None, "an image file for --prompt (repeatable, in order; a vision-language model); "
                                  "in a --prompts file give an \"images\" list in the prompt's object",
                                  metavar="PATH", repeat=True)
    system: str | None = opt(None, "a system message put before each prompt that has none (chat models)")
    chat_template: bool | None = opt(None, "render prompts with the tokenizer's chat template (default: when it has "
                                     "one); --no-chat-template sends the raw text")
    max_new_tokens: int = opt(64, "tokens to generate", range=AT_LEAST_ONE)
    temperature: float = opt(1.0, "sampling temperature (0 = greedy)", range=NON_NEGATIVE)
    top_p: float = opt(1.0, "nucleus sampling threshold, in (0, 1]",
                       range=dataclasses.replace(OPEN_UNIT, words="satisfy 0 < top_p <= 1"))
    num_samples: int = opt(1, "samples per prompt", range=AT_LEAST_ONE)
    batch_size: int = opt(16, "sequences sampled together (prompts x samples)", range=AT_LEAST_ONE)
    threads: int | None = same_as(RuntimeOptions, "threads")
    seed: int = opt(0, "random seed (the same seed gives the same samples)")
    jsonl: bool = opt(False, "print one JSON object per sample (always so when the chat template is applied)")

    def __post_init__(self) -> None:
        check_options(self)
        if self.image and self.prompts:
            raise ConfigError("--image goes with --prompt; in a --prompts file give an \"images\" list in each "
                              "prompt's JSON object")

    def sampling(self) -> dict:
        """The keyword arguments of dpokit.eval.generation.sample_ids these options give."""
        return {name: getattr(self, name) for name in SAMPLING}


SAMPLING = ("max_new_tokens", "temperature", "top_p", "num_samples", "seed", "batch_size", "chat_template", "system")
"""The options of GenerateConfig that dpokit.eval.generation's sampling functions take as keywords."""


@dataclass
class ScoringOptions(TokenizeOptions):
    """What `dpokit score` and `dpokit rank` share: the policy, its reference, β, the output and the tokenisation
    (TokenizeOptions: a too-long response is skipped, written with reward null and the reason, or an error)."""

    model: str = opt(None, "the DPO policy π: model directory, LoRA adapter directory or hub name; or a reward model "
                     "(a one-output sequence classifier such as `dpokit reward`'s output), whose score is the reward",
                     required=True)
    ref_model: str | None = opt(None, "the policy's reference π_ref (the model DPO started from); required unless "
                                "--model is a reward model")
    output: str = opt(None, "JSONL file to write ('-': standard output)", required=True)
    beta: float = opt(defaults_of(LossOptions)["beta"], "β of the implicit reward (the policy's training β; not "
                      "used with a reward model)", range=POSITIVE)
    batch_size: int = opt(16, "responses per forward pass (shortest first)", range=AT_LEAST_ONE)
    split: str = same_as(DataOptions, "split", help="split of a Hub data set or saved DatasetDict")
    dtype: str = opt("float32", "model dtype", choices=LOAD_DTYPES)
    attention: str = opt("auto", "attention kernel: auto (FlexAttention block masks on CUDA), sdpa, eager or flex",
                         choices=("auto", "sdpa", "eager", "flex"))
    threads: int | None = same_as(RuntimeOptions, "threads")

    def __post_init__(self) -> None:
        check_options(self)
        self.check_lengths()
        if self.ref_model is None and not self.reward_model:
            raise ConfigError("--ref-model is required: the implicit reward of a DPO policy compares it with its "
                              "reference (not so for a reward model, a one-output sequence classifier, as --model)")
        if self.ref_model is not None and self.reward_model:
            raise ConfigError(f"--ref-model: --model {self.model} is a reward model, whose score is the reward; it "
                              "takes no reference")

    @property
    def reward_model(self) -> bool:
        """Whether --model is a reward model (its score is the reward; dpokit.config.reward.is_reward_model_dir)."""
        return is_reward_model_dir(self.model)


@dataclass
class ScoreConfig(ScoringOptions):
    """Everything `dpokit score` takes."""

    data: str = opt(None, 'rows {"prompt", "response"}: strings, or a chat prompt (a list of messages) and its '
                    "reply; .jsonl, .json, .parquet, .csv, a saved data set or a Hub name", required=True)


@dataclass
class RankConfig(ScoringOptions):
    """Everything `dpokit rank` takes."""

    data: str = opt(None, 'rows {"prompt", "responses": [...]}: strings, or a chat prompt (a list of messages) and '
                    "its candidate replies; .jsonl, .json, .parquet, .csv, a saved data set or a Hub name",
                    required=True)


@dataclass
class MergeConfig:
    """Everything `dpokit merge` takes."""

    adapter: str = opt(None, "LoRA adapter directory (a LoRA run's final/ or checkpoint)", required=True)
    output: str = opt(None, "directory for the merged model", required=True)
    dtype: str = opt("float32", "dtype of the merged weights", choices=LOAD_DTYPES)

    def __post_init__(self) -> None:
        check_options(self)
