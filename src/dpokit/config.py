"""Training configuration: one typed dataclass, validated once, filled from YAML and/or command-line flags.

Every field's metadata carries its help text and the commands it belongs to, so the CLI's ``--help`` and the
YAML keys are the field names themselves (``max_length`` in YAML is ``--max-length`` on the command line).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dpokit.errors import ConfigError
from dpokit.losses.config import LOSS_TYPES

BOTH = ("dpo", "sft")
DPO = ("dpo",)
REQUIRED = ("model", "data", "output")


class Default(int):
    """An int default that remembers it was not given: equal to (and stored as) the plain number, but a check can
    tell the default ``max_length`` 512, which dpokit may fit to the model, from a ``--max-length 512`` the user
    asked for, which it must not change."""

    def __repr__(self) -> str:
        return int.__repr__(self)


def opt(default: Any, help: str, stages: tuple[str, ...] = BOTH, choices: tuple | None = None) -> Any:
    """A config field with its help text, the commands that take it and its allowed values."""
    return field(default=default, metadata={"help": help, "stages": stages, "choices": choices})


@dataclass
class TrainConfig:
    """Everything `dpokit dpo` and `dpokit sft` take. Field names are YAML keys and (with dashes) flags."""

    model: str = opt(None, "policy to start from: a Hugging Face model directory or hub name")
    data: str = opt(None, "training data: .jsonl/.json/.parquet/.csv file, save_to_disk directory, or hub name")
    output: str = opt(None, "output directory: checkpoints, final model, metrics.jsonl")
    eval_data: str | None = opt(None, "held-out evaluation data (same formats as --data)")
    eval_fraction: float = opt(0.0, "hold out this fraction of --data for evaluation when --eval-data is not given")
    split: str = opt("train", "split to read from a dataset directory or hub dataset")
    eval_split: str = opt("test", "split to read from --eval-data when it is a dataset directory or hub dataset")
    format: str = opt("auto", "data format", choices=("auto", "standard", "conversational", "implicit", "ranked", "completion",
                                                      "unpaired"))
    prompt_column: str = opt("prompt", "name of the prompt column")
    chosen_column: str = opt("chosen", "name of the chosen-response column")
    rejected_column: str = opt("rejected", "name of the rejected-response column")
    completion_column: str = opt("completion", "name of the completion column (SFT prompt/completion data)")
    responses_column: str = opt("responses", "name of the responses column (ranked data)")
    scores_column: str = opt("scores", "name of the scores column (ranked data)")
    data_cache: bool = opt(True, "cache the tokenised data on disk, keyed by the raw data, tokenizer and settings: "
                           "a later run with the same inputs skips loading and tokenising")
    data_cache_dir: str | None = opt(None, "where tokenised data is cached (default: $DPOKIT_CACHE or "
                                     "~/.cache/dpokit/tokenized)")
    streaming: bool = opt(False, "data larger than memory: read rows one at a time (Hub data sets streamed), "
                          "tokenise them chunk by chunk into shards on disk and train from the memory-mapped "
                          "shards; same examples, order and resume as without it. With --eval-fraction the "
                          "data is read twice (to count it, then to tokenise it)")
    on_filtered: str = opt("skip", "what to do with identical or too-long pairs: skip them (counted) or fail", choices=("skip", "error"))
    apply_chat_template: bool = opt(False, "render plain-text (standard-format) data with the tokenizer's chat "
                                    "template: each prompt as a user turn, each response as the assistant turn, "
                                    "tokenised exactly like conversational data")

    ref_model: str | None = opt(None, "reference model (default: a frozen copy of --model)", DPO)
    ref_dtype: str | None = opt(None, "reference model dtype (default: --dtype)", DPO, ("float32", "bfloat16", "float16"))
    loss: str = opt("sigmoid", f"preference loss: one of {', '.join(LOSS_TYPES)}, or several comma-separated "
                    "(weighted by --loss-weights); README: Losses", DPO)
    loss_weights: str | None = opt(None, "comma-separated weight of each loss given to --loss (default: 1 each)", DPO)
    beta: float = opt(0.1, "β: strength of the KL constraint to the reference (SimPO's paper uses 2-2.5; for orpo "
                      "it is ORPO's λ, the odds-ratio weight, as in TRL)", DPO)
    label_smoothing: float = opt(0.0, "assumed label-noise rate ε (conservative DPO for sigmoid; robust)", DPO)
    sft_weight: float = opt(0.0, "weight of an NLL term on chosen responses added to the preference loss", DPO)
    reference_free: bool = opt(False, "drop the reference model (its log-probs are taken as 0); implied by the "
                               "reference-free losses simpo and orpo", DPO)
    simpo_gamma: float | None = opt(None, "SimPO's target reward margin γ (--loss simpo only; default 0.5, TRL's)", DPO)
    dpop_lambda: float | None = opt(None, "DPO-Positive's penalty weight λ (--loss dpop only; default 50)", DPO)
    ld_alpha: float | None = opt(None, "LD-DPO length desensitisation α in [0, 1]: response tokens beyond the shorter "
                                 "response of the pair count α times in policy and reference log-probs", DPO)
    use_weighting: bool = opt(False, "WPO: weight each pair's loss by the policy's probability weights of its two "
                              "responses (one extra forward pass without gradients per batch)", DPO)
    desirable_weight: float | None = opt(None, "KTO: weight of the desirable examples' losses (--loss kto only; "
                                         "default 1)", DPO)
    undesirable_weight: float | None = opt(None, "KTO: weight of the undesirable examples' losses (--loss kto "
                                           "only; default 1)", DPO)
    average_logps: bool = opt(False, "average response log-probs over tokens instead of summing them", DPO)
    precompute_ref: bool = opt(False, "compute reference log-probs once before training, cached on disk; "
                               "the reference model is then not kept in memory", DPO)
    ref_cache_dir: str | None = opt(None, "where to cache precomputed reference log-probs (default: OUTPUT/ref_cache)", DPO)
    ref_offload: bool = opt(False, "keep the resident reference model's weights in CPU memory (FSDP2/ZeRO-3: "
                            "its shards), moved to the accelerator layer by layer", DPO)
    ref_adapter: str | None = opt(None, "when --model is a LoRA adapter: the adapter directory whose starting state "
                                  "is the reference (default: --model itself)", DPO)
    sync_ref_every: int | None = opt(None, "TR-DPO: move the resident reference toward the policy every N optimizer "
                                     "steps, π_ref <- α·π_θ + (1-α)·π_ref (default/0: a fixed reference)", DPO)
    ref_mixup_alpha: float = opt(0.6, "TR-DPO's α for --sync-ref-every, in (0, 1]: 1 copies the policy (hard "
                                 "update); TRL's ref_model_mixup_alpha", DPO)

    lora_r: int | None = opt(None, "train a LoRA adapter of this rank on the frozen model (peft); the reference is "
                             "the model with the adapter disabled")
    lora_alpha: float | None = opt(None, "LoRA scaling numerator α (scale α/r; default: 2 × --lora-r)")
    lora_dropout: float = opt(0.0, "dropout on the LoRA adapter's input (the reference never sees it)")
    lora_target_modules: str | None = opt(None, "comma-separated module names to adapt (default: every linear "
                                          "layer of the decoder)")
    load_in_4bit: bool = opt(False, "QLoRA: load the frozen base in 4-bit NF4 (bitsandbytes); needs --lora-r or an "
                             "adapter --model")
    load_in_8bit: bool = opt(False, "load the frozen base in 8-bit (bitsandbytes); needs --lora-r or an adapter --model")
    gradient_checkpointing: bool = opt(False, "recompute each decoder layer's activations in the backward pass "
                                       "(less memory, same numbers, one more forward pass of compute)")
    return_freed_memory: bool = opt(False, "CPU training on glibc: serve every block of at least 128 KiB by mmap, so "
                                    "freed activations leave the process at once (lower peak RSS, slower steps: "
                                    "see dpokit.runtime.memory)")

    batch_size: int = opt(8, "examples per process per micro-batch (global batch = this × grad_accum × processes)")
    eval_batch_size: int | None = opt(None, "examples per evaluation batch (default: --batch-size)")
    grad_accum: int = opt(1, "micro-batches accumulated per optimizer step")
    lr: float = opt(1e-6, "peak learning rate")
    optimizer: str = opt("rmsprop", "optimizer (the paper uses RMSprop); adamw8bit and paged_adamw8bit keep "
                         "Adam's states in 8 bits (bitsandbytes)",
                         choices=("rmsprop", "adamw", "adamw8bit", "paged_adamw8bit"))
    weight_decay: float = opt(0.0, "weight decay")
    warmup_steps: int = opt(Default(150), "linear warm-up steps")
    warmup_ratio: float | None = opt(None, "linear warm-up over this fraction of the run's steps (instead of "
                                     "--warmup-steps)")
    schedule: str = opt("constant", "learning-rate schedule after warm-up", choices=("constant", "cosine"))
    max_steps: int | None = opt(None, "optimizer steps to run (overrides --epochs)")
    epochs: float = opt(1.0, "passes over the training data when --max-steps is not given")
    max_grad_norm: float = opt(10.0, "clip the gradient norm to this (0 = no clipping)")
    max_length: int = opt(Default(512), "maximum prompt + response tokens; the default is lowered to the model's "
                          "maximum positions when it has fewer (a larger value given is an error)")
    max_prompt_length: int = opt(Default(256), "prompt length the prompt is cut to when prompt + response is too "
                                 "long; the default is lowered to half of --max-length when that is smaller")
    truncation: str = opt("keep_end", "which end of a too-long prompt to keep", choices=("keep_end", "keep_start"))
    dtype: str = opt("float32", "training precision: float32, or bfloat16 mixed precision", choices=("float32", "bfloat16"))
    seed: int = opt(0, "random seed (data order, initialisation of anything random)")
    eval_every: int = opt(0, "evaluate every N steps (0 = only at the end)")
    save_every: int = opt(0, "checkpoint every N steps (0 = only at the end and by --save-every-minutes)")
    save_every_minutes: float = opt(30.0, "also checkpoint when this many minutes have passed since the last one "
                                    "(0 = off): a kill never loses more")
    keep_checkpoints: int = opt(0, "keep only the newest N checkpoints, pruned after a newer one is complete (0 = all)")
    overwrite: bool = opt(False, "replace the run already in --output (default: refuse; --resume continues it)")
    log_every: int = opt(1, "log metrics every N steps")
    resume: bool = opt(False, "continue from the latest checkpoint in --output")
    layout: str = opt("packed", "batch layout: packed (fastest), shared prompt, or plain (one row per response)",
                      choices=("packed", "shared", "plain"))
    attention: str = opt("auto", "attention kernel: auto (for the shared/packed layouts FlexAttention block masks "
                         "on CUDA, one SDPA call per prompt and per response on CPU: segments), sdpa (one dense "
                         "masked call), eager, flex or segments", choices=("auto", "sdpa", "eager", "flex", "segments"))
    logits: str = opt("chunked", "chunked: logits only at response positions, in chunks; full: every position",
                      choices=("chunked", "full"))
    forward_tokens: int | None = opt(None, "split each micro-batch into forward passes of at most this many tokens, "
                                     "shortest examples together (exact; faster on CPU). Default: 1024 on CPU, "
                                     "whole micro-batch on GPU; 0 = whole micro-batch")
    threads: int | None = opt(None, "torch intra-op CPU threads (default: chosen from the model's width and the CPUs "
                              "free for this process; OMP_NUM_THREADS is respected)")
    trust_remote_code: bool = opt(False, "allow model code from the model's repository to run")
    gguf_file: str | None = opt(None, "load --model from this GGUF file inside the --model directory (weights "
                                "dequantised; the trained model is saved as a Hugging Face directory)")
    save_final: bool = opt(True, "save the final model to OUTPUT/final")

    def __post_init__(self) -> None:
        for name in REQUIRED:
            if not getattr(self, name):
                raise ConfigError(f"--{name.replace('_', '-')} is required")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise ConfigError(f"--{f.name.replace('_', '-')} must be one of {', '.join(choices)}; got {value!r}")
        if self.save_every_minutes < 0 or self.keep_checkpoints < 0 or self.save_every < 0:
            raise ConfigError("--save-every, --save-every-minutes and --keep-checkpoints must not be negative")
        positive = ("batch_size", "grad_accum", "max_length", "max_prompt_length", "log_every")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive; got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be positive; got {self.lr}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be at least 1; got {self.threads}")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"--eval-fraction must be in [0, 1); got {self.eval_fraction}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ConfigError(f"--max-steps must be positive; got {self.max_steps}")
        if self.max_steps is None and not self.epochs > 0:
            raise ConfigError(f"--epochs must be positive; got {self.epochs}")
        self._check_schedule()
        self._check_loss()
        self._check_adapters()
        self._check_sync_ref()

    def _check_loss(self) -> None:
        from dpokit.losses.config import REFERENCE_FREE_LOSSES

        # the loss's own checks (β, ε and which losses take it), up front
        self.loss = self.loss_config().loss_type  # normalised: "sigmoid, bco_pair" -> "sigmoid,bco_pair"
        if self.loss in REFERENCE_FREE_LOSSES:
            for flag in ("ref_model", "ref_adapter", "precompute_ref", "ref_offload"):
                if getattr(self, flag):
                    raise ConfigError(f"--{flag.replace('_', '-')}: loss {self.loss!r} is reference-free")
            self.reference_free = True  # no reference model is loaded for it
        if self.ld_alpha is not None and self.precompute_ref:
            raise ConfigError("--ld-alpha with --precompute-ref is not supported: the cached reference log-probs are "
                              "unweighted sums")
        if self.loss == "kto":
            self._check_kto()

    def _check_kto(self) -> None:
        """What KTO's KL term (mismatched pairs built within each micro-batch) rules out."""
        if self.batch_size < 2:
            raise ConfigError("--loss kto needs --batch-size of at least 2: its KL term pairs each prompt with "
                              "another example's completion of the same micro-batch")
        for flag, why in (("precompute_ref", "its KL pairs change with every batch, so their reference log-probs "
                                             "cannot be cached"),
                          ("streaming", "its labels are not kept in the streamed shards"),
                          ("average_logps", "KTO is defined on summed log-probs")):
            if getattr(self, flag):
                raise ConfigError(f"--{flag.replace('_', '-')} is not supported with --loss kto: {why}")

    def _check_sync_ref(self) -> None:
        """TR-DPO needs a resident reference model whose weights can follow the policy's."""
        if self.sync_ref_every is not None and self.sync_ref_every < 0:
            raise ConfigError(f"--sync-ref-every must not be negative; got {self.sync_ref_every}")
        if not 0 < self.ref_mixup_alpha <= 1:
            raise ConfigError(f"--ref-mixup-alpha must be in (0, 1]; got {self.ref_mixup_alpha}")
        if not self.sync_ref_every:
            return
        from dpokit.losses.config import REFERENCE_FREE_LOSSES

        why = ("--precompute-ref caches the reference log-probs once" if self.precompute_ref else
               f"loss {self.loss!r} is reference-free" if self.loss in REFERENCE_FREE_LOSSES else
               "--reference-free drops the reference model" if self.reference_free else
               "with LoRA (an adapter on a frozen base, whose reference is that base) dpokit keeps the reference "
               "fixed; fine-tune the full model to move it" if self.uses_lora else
               "--ref-offload holds its weights in CPU memory behind offload hooks" if self.ref_offload else None)
        if why:
            raise ConfigError(f"--sync-ref-every needs a resident reference model that it can update, but {why}")

    def loss_config(self):
        """The validated LossConfig of this run (dpokit.losses.config.LossConfig)."""
        from dpokit.losses.config import LossConfig

        return LossConfig(self.loss, self.beta, self.label_smoothing, self.reference_free, self.sft_weight,
                          simpo_gamma=self.simpo_gamma, loss_weights=parse_loss_weights(self.loss_weights),
                          dpop_lambda=self.dpop_lambda, ld_alpha=self.ld_alpha,
                          use_weighting=self.use_weighting, desirable_weight=self.desirable_weight,
                          undesirable_weight=self.undesirable_weight)

    def _check_schedule(self) -> None:
        if self.warmup_steps < 0:
            raise ConfigError(f"--warmup-steps must not be negative; got {self.warmup_steps}")
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise ConfigError(f"--warmup-ratio must be in [0, 1); got {self.warmup_ratio}")
            if not self.is_default("warmup_steps"):
                raise ConfigError("--warmup-ratio and --warmup-steps exclude each other; give one")
        for name in ("eval_every", "eval_fraction"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must not be negative; got {getattr(self, name)}")
        if self.max_prompt_length >= self.max_length and not self.is_default("max_prompt_length"):
            raise ConfigError(f"--max-prompt-length ({self.max_prompt_length}) must be less than --max-length "
                              f"({self.max_length}): a too-long example keeps its prompt cut to this length")
        if self.is_default("max_prompt_length") and self.max_prompt_length >= self.max_length:
            self.max_prompt_length = Default(self.max_length // 2)

    def fit_max_length(self, positions: int | None, model: str) -> str | None:
        """Fit --max-length to a model with `positions` maximum positions: the default is lowered (the returned
        note says so), a larger value the user gave is an error. None when nothing changes."""
        if positions is None or self.max_length <= positions:
            return None
        if not self.is_default("max_length"):
            raise ConfigError(f"--max-length {self.max_length} is more than the {positions} positions of {model} "
                              f"(max_position_embeddings); give at most {positions}")
        default = int(self.max_length)
        self.max_length = positions
        note = f"note: --max-length {positions}, not the default {default}: {model} has {positions} positions"
        if self.max_prompt_length >= positions:
            if not self.is_default("max_prompt_length"):
                raise ConfigError(f"--max-prompt-length {self.max_prompt_length} must be less than the {positions} "
                                  f"positions of {model}")
            self.max_prompt_length = Default(positions // 2)
            note += f"; --max-prompt-length {self.max_prompt_length}"
        return note

    def is_default(self, name: str) -> bool:
        """Whether option `name` holds its default because nobody gave it (see :class:`Default`)."""
        return isinstance(getattr(self, name), Default)

    def _check_adapters(self) -> None:
        adapter_model = is_adapter_dir(self.model)
        if self.lora_r is not None and self.lora_r <= 0:
            raise ConfigError(f"--lora-r must be positive; got {self.lora_r}")
        if self.lora_r is not None and adapter_model:
            raise ConfigError(f"--model {self.model} is already a LoRA adapter, which is trained further; "
                              "--lora-r adds a fresh adapter to a full model")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"--lora-dropout must be in [0, 1); got {self.lora_dropout}")
        if self.lora_r is None and not adapter_model:
            for flag in ("lora_alpha", "lora_target_modules"):
                if getattr(self, flag) is not None:
                    raise ConfigError(f"--{flag.replace('_', '-')} needs --lora-r (or an adapter directory as --model)")
        if self.load_in_4bit and self.load_in_8bit:
            raise ConfigError("--load-in-4bit and --load-in-8bit exclude each other")
        if (self.load_in_4bit or self.load_in_8bit) and self.lora_r is None and not adapter_model:
            raise ConfigError("quantized weights cannot be trained directly: add --lora-r (QLoRA) or start from "
                              "an adapter directory")
        if self.load_in_4bit or self.load_in_8bit or self.optimizer.endswith("8bit"):
            import importlib.util

            if importlib.util.find_spec("bitsandbytes") is None:
                raise ConfigError("--load-in-4bit/--load-in-8bit and 8-bit optimizers need bitsandbytes: "
                                  "pip install bitsandbytes")
        if self.ref_adapter is not None:
            if not adapter_model:
                raise ConfigError("--ref-adapter applies when --model is a LoRA adapter directory")
            if not is_adapter_dir(self.ref_adapter):
                raise ConfigError(f"--ref-adapter {self.ref_adapter}: not an adapter directory (no adapter_config.json)")
            if self.ref_model is not None:
                raise ConfigError("--ref-adapter and --ref-model name two different references; give one")
        if self.ref_offload and (self.precompute_ref or self.reference_free or
                                 ((self.lora_r is not None or adapter_model) and self.ref_model is None)):
            raise ConfigError("--ref-offload places a separate reference model; this run has none "
                              "(precomputed, reference-free, or the reference is inside the LoRA model)")

    @property
    def uses_lora(self) -> bool:
        """Whether the policy is a LoRA adapter (fresh, or loaded from an adapter directory)."""
        return self.lora_r is not None or is_adapter_dir(self.model)

    @property
    def output_dir(self) -> Path:
        """The output directory as a Path."""
        return Path(self.output)


def is_adapter_dir(path: str | Path) -> bool:
    """Whether `path` is a local PEFT adapter directory (it holds ``adapter_config.json``)."""
    return (Path(path) / "adapter_config.json").is_file()


def parse_loss_weights(text: str | None) -> tuple[float, ...] | None:
    """``"0.8,0.2"`` -> ``(0.8, 0.2)``; a one-line ConfigError naming --loss-weights for anything else."""
    if text is None:
        return None
    try:
        return tuple(float(part) for part in str(text).split(","))
    except ValueError:
        raise ConfigError(f"--loss-weights must be comma-separated numbers; got {text!r}") from None


def fields_for(stage: str) -> list[dataclasses.Field]:
    """The TrainConfig fields that `stage` ("dpo" or "sft") takes."""
    return [f for f in dataclasses.fields(TrainConfig) if stage in f.metadata["stages"]]


def load_yaml_mapping(path: str | Path, command: str, known: Iterable[str]) -> dict[str, Any]:
    """Read a YAML config of option names (underscores or dashes) to values for `dpokit command`; every key must
    be in `known` (an unknown one is an error, with the closest known name). Keys come back with underscores."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: a directory, not a YAML config file") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of option names to values")
    known = sorted(known)
    unknown = sorted(str(k) for k in data if str(k).replace("-", "_") not in known)
    if unknown:
        hints = [f"{k} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(k.replace("-", "_"), known, 1))
                 else k for k in unknown]
        raise ConfigError(f"{path}: unknown option(s) for `dpokit {command}`: {', '.join(hints)}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def read_yaml(path: str | Path, stage: str) -> dict[str, Any]:
    """Read a YAML config, check its keys against the fields of `stage`, and return it as a dict."""
    values = load_yaml_mapping(path, stage, (f.name for f in fields_for(stage)))
    types = {f.name: str(f.type) for f in fields_for(stage)}
    for key, value in values.items():
        expected = _expected_type(types[key])
        if value is None and "None" in types[key]:
            continue
        ok = isinstance(value, expected) and not (expected is not bool and isinstance(value, bool))
        if not ok:
            kind = "a number" if isinstance(expected, tuple) else expected.__name__
            raise ConfigError(f"{path}: option '{key}' must be {kind}, got {value!r}")
    return values


def _expected_type(annotation: str):
    if "bool" in annotation:
        return bool
    if "float" in annotation:
        return (int, float)
    if "int" in annotation:
        return int
    return str


def make_config(stage: str, values: dict[str, Any]) -> TrainConfig:
    """Build a validated TrainConfig for `stage` from a dict of field values."""
    known = {f.name for f in fields_for(stage)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown option(s) for `dpokit {stage}`: {', '.join(unknown)}")
    return TrainConfig(**values)
