"""The options of `dpokit dpo` and `dpokit sft`: TrainConfig, composed of the pieces each option belongs to
(model, LoRA, data, tokenisation, loss, reference, optimisation, run directory, runtime), validated once.

Field names are YAML keys and (with dashes) flags; every option is declared once, in its piece.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dpokit.config.data import DataOptions, TokenizeOptions
from dpokit.config.hub import HubOptions
from dpokit.config.loss import REFERENCE_FREE_LOSSES, LossOptions
from dpokit.config.model import LoraOptions, ModelOptions, is_adapter_dir
from dpokit.config.tracking import TrackingOptions
from dpokit.config.options import (AT_LEAST_ONE, DPO, FRACTION, NON_NEGATIVE, OPEN_UNIT, POSITIVE, Default,
                                   check_options, opt)
from dpokit.errors import ConfigError


@dataclass
class ReferenceOptions:
    """The reference model π_ref: resident, precomputed, offloaded, an adapter, or moving (TR-DPO)."""

    ref_model: str | None = opt(None, "reference model (default: a frozen copy of --model)", stages=DPO)
    ref_dtype: str | None = opt(None, "reference model dtype (default: --dtype)", stages=DPO, choices=("float32", "bfloat16", "float16"))
    precompute_ref: bool = opt(False, "compute reference log-probs once before training, cached on disk; "
                               "the reference model is then not kept in memory", stages=DPO, aliases=("--precompute-ref-log-probs",))
    ref_cache_dir: str | None = opt(None, "where to cache precomputed reference log-probs (default: OUTPUT/ref_cache)", stages=DPO)
    ref_offload: bool = opt(False, "keep the resident reference model's weights in CPU memory (FSDP2/ZeRO-3: "
                            "its shards), moved to the accelerator layer by layer", stages=DPO)
    ref_adapter: str | None = opt(None, "when --model is a LoRA adapter: the adapter directory whose starting state "
                                  "is the reference (default: --model itself)", stages=DPO)
    sync_ref_every: int | None = opt(None, "TR-DPO: move the resident reference toward the policy every N optimizer "
                                     "steps, π_ref <- α·π_θ + (1-α)·π_ref (default/0: a fixed reference)", stages=DPO, range=NON_NEGATIVE, aliases=("--ref-model-sync-steps",))
    ref_mixup_alpha: float = opt(0.6, "TR-DPO's α for --sync-ref-every, in (0, 1]: 1 copies the policy (hard "
                                 "update); TRL's ref_model_mixup_alpha", stages=DPO, range=OPEN_UNIT, aliases=("--ref-model-mixup-alpha",))


@dataclass
class OptimOptions:
    """The optimisation: batch, learning rate and schedule, steps, clipping, seed."""

    batch_size: int = opt(8, "examples per process per micro-batch (global batch = this × grad_accum × processes)", range=POSITIVE, aliases=("--per-device-train-batch-size",))
    eval_batch_size: int | None = opt(None, "examples per evaluation batch (default: --batch-size)", range=POSITIVE, aliases=("--per-device-eval-batch-size",))
    grad_accum: int = opt(1, "micro-batches accumulated per optimizer step", range=POSITIVE, aliases=("--gradient-accumulation-steps",))
    lr: float = opt(1e-6, "peak learning rate", range=POSITIVE, aliases=("--learning-rate",))
    optimizer: str = opt("rmsprop", "optimizer (the paper uses RMSprop); adamw8bit and paged_adamw8bit keep "
                         "Adam's states in 8 bits (bitsandbytes)",
                         choices=("rmsprop", "adamw", "adamw8bit", "paged_adamw8bit"))
    weight_decay: float = opt(0.0, "weight decay", range=NON_NEGATIVE)
    warmup_steps: int = opt(Default(150), "linear warm-up steps", range=NON_NEGATIVE)
    warmup_ratio: float | None = opt(None, "linear warm-up over this fraction of the run's steps (instead of "
                                     "--warmup-steps)", range=FRACTION)
    schedule: str = opt("constant", "learning-rate schedule after warm-up", choices=("constant", "cosine"), aliases=("--lr-scheduler-type",))
    max_steps: int | None = opt(None, "optimizer steps to run (overrides --epochs)", range=POSITIVE)
    epochs: float = opt(1.0, "passes over the training data when --max-steps is not given", range=POSITIVE, aliases=("--num-train-epochs",))
    max_grad_norm: float = opt(10.0, "clip the gradient norm to this (0 = no clipping)", range=NON_NEGATIVE)
    seed: int = opt(0, "random seed (data order, initialisation of anything random)")


@dataclass
class RunOptions:
    """The run directory: output, evaluation, logging and checkpoints, resume."""

    output: str = opt(None, "output directory: checkpoints, final model, metrics.jsonl", required=True, aliases=("--output-dir",))
    eval_every: int = opt(0, "evaluate every N steps (0 = only at the end)", range=NON_NEGATIVE, aliases=("--eval-steps",))
    save_every: int = opt(0, "checkpoint every N steps (0 = only at the end and by --save-every-minutes)", range=NON_NEGATIVE, aliases=("--save-steps",))
    save_every_minutes: float = opt(30.0, "also checkpoint when this many minutes have passed since the last one "
                                    "(0 = off): a kill never loses more", range=NON_NEGATIVE)
    keep_checkpoints: int = opt(0, "keep only the newest N checkpoints, pruned after a newer one is complete (0 = all)", range=NON_NEGATIVE, aliases=("--save-total-limit",))
    overwrite: bool = opt(False, "replace the run already in --output (default: refuse; --resume continues it)")
    early_stopping_patience: int = opt(0, "end the run when the held-out loss has not improved for N evaluations in "
                                       "a row (0 = never; needs evaluation data and --eval-every)",
                                       range=NON_NEGATIVE)
    log_every: int = opt(1, "log metrics every N steps", range=POSITIVE, aliases=("--logging-steps",))
    resume: bool = opt(False, "continue from the latest checkpoint in --output")
    save_final: bool = opt(True, "save the final model to OUTPUT/final")

    def check_early_stopping(self) -> None:
        """--early-stopping-patience needs evaluations to stop on: held-out data and --eval-every."""
        if self.early_stopping_patience and not (getattr(self, "eval_data", None) or getattr(self, "eval_fraction", 0)):
            raise ConfigError("--early-stopping-patience needs held-out data: give --eval-data or --eval-fraction")
        if self.early_stopping_patience and not self.eval_every:
            raise ConfigError("--early-stopping-patience needs --eval-every N: it counts evaluations without "
                              "improvement, and without --eval-every there is only the last one")

    @property
    def output_dir(self) -> Path:
        """The output directory as a Path."""
        return Path(self.output)


@dataclass
class RuntimeOptions:
    """How the work is laid out on the hardware: batch layout, kernels, memory, threads. None changes a number."""

    layout: str = opt("packed", "batch layout: packed (fastest), shared prompt, or plain (one row per response)",
                      choices=("packed", "shared", "plain"))
    attention: str = opt("auto", "attention kernel: auto (for the shared/packed layouts FlexAttention block masks "
                         "on CUDA, one SDPA call per prompt and per response on CPU: segments), sdpa (one dense "
                         "masked call), eager, flex or segments", choices=("auto", "sdpa", "eager", "flex", "segments"))
    logits: str = opt("chunked", "chunked: logits only at response positions, in chunks; full: every position",
                      choices=("chunked", "full"))
    forward_tokens: int | None = opt(None, "split each micro-batch into forward passes of at most this many tokens, "
                                     "shortest examples together (exact; faster on CPU). Default: 1024 on CPU, "
                                     "whole micro-batch on GPU; 0 = whole micro-batch", range=NON_NEGATIVE)
    gradient_checkpointing: bool = opt(False, "recompute each decoder layer's activations in the backward pass "
                                       "(less memory, same numbers, one more forward pass of compute)")
    return_freed_memory: bool = opt(False, "CPU training on glibc: serve every block of at least 128 KiB by mmap, so "
                                    "freed activations leave the process at once (lower peak RSS, slower steps: "
                                    "see dpokit.runtime.memory)")
    threads: int | None = opt(None, "torch intra-op CPU threads (default: chosen from the model's width and the CPUs "
                              "free for this process; OMP_NUM_THREADS is respected)", range=AT_LEAST_ONE)


@dataclass
class TrainConfig(HubOptions, TrackingOptions, RunOptions, RuntimeOptions, OptimOptions, LoraOptions,
                  ReferenceOptions, LossOptions, TokenizeOptions, DataOptions, ModelOptions):
    """Everything `dpokit dpo` and `dpokit sft` take. Field names are YAML keys and (with dashes) flags."""

    def __post_init__(self) -> None:
        check_options(self)  # required, choices, finite and in range: each option's own declaration
        self._check_schedule()
        self._check_loss()
        self._check_adapters()
        self._check_sync_ref()
        self.check_tracking()  # a tracker asked for but not installed: before anything loads

    def _check_loss(self) -> None:
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
        if not self.sync_ref_every:
            return
        why = ("--precompute-ref caches the reference log-probs once" if self.precompute_ref else
               f"loss {self.loss!r} is reference-free" if self.loss in REFERENCE_FREE_LOSSES else
               "--reference-free drops the reference model" if self.reference_free else
               "with LoRA (an adapter on a frozen base, whose reference is that base) dpokit keeps the reference "
               "fixed; fine-tune the full model to move it" if self.uses_lora else
               "--ref-offload holds its weights in CPU memory behind offload hooks" if self.ref_offload else None)
        if why:
            raise ConfigError(f"--sync-ref-every needs a resident reference model that it can update, but {why}")

    def _check_schedule(self) -> None:
        if self.warmup_ratio is not None and not self.is_default("warmup_steps"):
            raise ConfigError("--warmup-ratio and --warmup-steps exclude each other; give one")
        self.check_lengths()
        self.check_early_stopping()

    def _check_adapters(self) -> None:
        self.check_lora()
        adapter_model = is_adapter_dir(self.model)
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


