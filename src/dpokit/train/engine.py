"""The engines: how the policy (and a resident reference) are placed on processes and kept in sync.

The policy's whole scoring path (layout -> decoder -> response-only log-probs) is the ``forward`` of
:class:`Scorer`, the one module that accelerate prepares. The engine chosen by the launcher config then runs
its own machinery on every forward and backward: DDP's bucketed all-reduce (overlapped with the backward
pass, skipped with ``no_sync`` on all but the last micro-batch of a step), FSDP2's per-layer all-gather and
reduce-scatter, DeepSpeed ZeRO's partitioned gradients and optimizer. The trainer never all-reduces
gradients itself.

Every engine averages gradients over processes; the trainer divides each micro-batch's loss sum by the
divisor of the whole global batch and multiplies by the number of processes, so the update is the gradient
of the global batch's mean loss for any split into processes and micro-batches.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Callable, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import Tensor, nn

from dpokit.data.batching import Batch
from dpokit.errors import ConfigError
from dpokit.models.logprobs import sequence_alignment_logprobs, sequence_logprobs, token_logprobs
from dpokit.models.rewards import is_reward_model, sequence_rewards

ReferenceState = Callable[[nn.Module], contextlib.AbstractContextManager]


def _no_change(model: nn.Module) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


class Scorer(nn.Module):
    """A causal LM whose forward is ``batch -> per-sequence response log-probs`` (float32); for a reward model (a
    sequence classifier), ``batch -> per-sequence rewards`` (dpokit.models.rewards.sequence_rewards).

    ``forward(batch, reference=True)`` scores the batch as the reference policy, without gradients, when the
    reference lives inside the same weights: the base model with its LoRA adapter disabled, or a frozen
    second adapter (`reference_state` switches to it). Going through this module's forward either way is what
    lets an engine gather sharded weights for the reference pass too.
    """

    def __init__(self, model: nn.Module, *, chunked: bool = True, reference_state: ReferenceState | None = None):
        super().__init__()
        self.model = model
        self.chunked = chunked
        self.reference_state = reference_state
        self.rewards = is_reward_model(model)  # forward gives rewards, not log-probs
        # accelerate's FSDP2 wrapping reads these to shard per decoder layer and to group embedding and head
        self._no_split_modules = getattr(model, "_no_split_modules", None)
        self.base_model_prefix = "model"

    def get_input_embeddings(self) -> nn.Module:
        """The wrapped model's input embedding."""
        return self.model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        """The wrapped model's output layer."""
        return self.model.get_output_embeddings()

    def forward(self, batch: Batch, reference: bool = False, alignment: bool = False, tokens: bool = False) -> Tensor:
        """Summed response log-probs of every sequence of `batch` (as the reference when `reference`); with
        `alignment`, WPO's weight exponents instead (logprobs.sequence_alignment_logprobs, no gradients); with
        `tokens`, the policy's log-prob of every response token (``batch.target_ids`` order: token-level losses
        such as unlikelihood)."""
        if self.rewards:  # a reward model: its score of each sequence (dpokit.models.rewards)
            return sequence_rewards(self.model, batch)
        if tokens:
            return token_logprobs(self.model, batch, chunked=self.chunked)
        if alignment:
            return sequence_alignment_logprobs(self.model, batch, chunked=self.chunked)
        if not reference:
            return sequence_logprobs(self.model, batch, chunked=self.chunked)
        if self.reference_state is None:
            raise RuntimeError("this model holds no reference (no adapter to disable)")
        with torch.no_grad(), self.reference_state(self.model):
            return sequence_logprobs(self.model, batch, chunked=self.chunked)


def unwrap_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's (and DeepSpeed's) wrappers: its param_groups set the rate."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def engine_name(accelerator: Accelerator) -> str:
    """`single`, `ddp`, `fsdp2` or `zero1`/`zero2`/`zero3`: the engine the launcher chose."""
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        return f"zero{accelerator.state.deepspeed_plugin.zero_stage}"
    if kind == DistributedType.FSDP:
        return "fsdp2"
    return "ddp" if accelerator.num_processes > 1 else "single"


def shards_parameters(accelerator: Accelerator) -> bool:
    """Whether every forward pass gathers weights across processes (all processes must run it in lockstep)."""
    return engine_name(accelerator) in ("fsdp2", "zero3")


def engine_on_cpu(accelerator: Accelerator) -> None:
    """Set up the FSDP2 or DeepSpeed engine the launcher asked for on a CPU-only multi-process launch.

    accelerate enables FSDP and DeepSpeed only on accelerators; on CPUs it falls back to plain data
    parallelism without a word. Both engines run on CPU with gloo (torch's fully_shard on a CPU device mesh,
    DeepSpeed's CPU accelerator), so dpokit installs the plugin accelerate's launcher configured itself.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin

    state = accelerator.state
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        plugin = FullyShardedDataParallelPlugin()
        if accelerator.mixed_precision != "no":
            plugin.set_mixed_precision(accelerator.mixed_precision)
        state.fsdp_plugin = plugin
        kind = DistributedType.FSDP
    elif os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        # DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce kernel on first use (1-2 minutes
        # of C++ build, repeated per Python environment); on CPU dpokit communicates over gloo like the others.
        import deepspeed.comm.torch as ds_torch

        ds_torch.build_shm_op = lambda: None
        plugin = DeepSpeedPlugin()
        plugin.set_mixed_precision(accelerator.mixed_precision)
        plugin.select(_from_accelerator_state=True)
        state.deepspeed_plugins = plugin
        kind = DistributedType.DEEPSPEED
    else:
        return
    # accelerate copies the process-wide state into every AcceleratorState it builds later: set it in both
    PartialState._shared_state["distributed_type"] = kind
    state.distributed_type = kind


def check_engine(accelerator: Accelerator) -> None:
    """Refuse an engine setup that cannot run, before any model is loaded."""
    if accelerator.distributed_type == DistributedType.FSDP and accelerator.state.fsdp_plugin.fsdp_version != 2:
        raise ConfigError("dpokit supports FSDP2 only: set fsdp_version: 2 in the accelerate config "
                          "(configs/accelerate/fsdp2.yaml)")
    if accelerator.distributed_type not in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU,
                                            DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ConfigError(f"engine {accelerator.distributed_type} is not supported: use DDP, FSDP2 or DeepSpeed")


def configure_deepspeed(accelerator: Accelerator, micro_batch: int, max_grad_norm: float) -> None:
    """Fill the DeepSpeed config from dpokit's options (micro-batch, clipping) before the engine is built.

    Accumulation is dpokit's: DeepSpeed sees one micro-step per backward and is told where the step ends,
    so its own accumulation count stays 1 (it would otherwise rescale the loss).
    """
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = micro_batch
    ds["gradient_accumulation_steps"] = 1
    ds["train_batch_size"] = micro_batch * accelerator.num_processes
    ds["gradient_clipping"] = max_grad_norm
    ds.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True
    for key in ("bf16", "fp16"):
        ds.setdefault(key, {})["enabled"] = key == "bf16" and accelerator.mixed_precision == "bf16"


@contextlib.contextmanager
def micro_step(accelerator: Accelerator, scorer: nn.Module, last: bool) -> Iterator[None]:
    """One micro-batch's forward and backward: gradients are synchronised only on the step's last one.

    DDP skips its all-reduce (`no_sync`) on the others; DeepSpeed is told whether this backward ends the
    step (and then steps its optimizer inside the backward). FSDP2 reduce-scatters every micro-batch, which
    keeps only the sharded gradients in memory.
    """
    accelerator.gradient_state._set_sync_gradients(last)
    skip = not last and engine_name(accelerator) == "ddp"
    try:
        with accelerator.no_sync(scorer) if skip else contextlib.nullcontext():
            yield
    finally:
        accelerator.gradient_state._set_sync_gradients(True)


def place_reference(accelerator: Accelerator, reference: Scorer, *, offload: bool = False) -> nn.Module:
    """Place a frozen reference model like the policy: replicated (DDP), or sharded for inference (FSDP2,
    ZeRO-3) with no optimizer state or gradients. `offload` keeps its weights in CPU memory."""
    reference.eval().requires_grad_(False)
    name = engine_name(accelerator)
    if name == "fsdp2":
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

        policy = CPUOffloadPolicy(pin_memory=False) if offload else OffloadPolicy()
        layer_names = set(reference._no_split_modules or ())
        for module in reference.modules():
            if type(module).__name__ in layer_names:
                fully_shard(module, offload_policy=policy)
        if not offload:
            reference.to(accelerator.device)
        return fully_shard(reference, offload_policy=policy)
    if name == "zero3":
        import deepspeed

        ds = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
        zero = ds.setdefault("zero_optimization", {})
        zero["stage"] = 3
        zero["offload_param"] = {"device": "cpu" if offload else "none"}
        zero.pop("offload_optimizer", None)
        ds.pop("optimizer", None)
        ds.pop("scheduler", None)
        engine, *_ = deepspeed.initialize(model=reference, config=ds)
        engine.eval()  # DeepSpeed's eval() returns None
        return engine
    if offload and accelerator.device.type != "cpu":
        from accelerate import cpu_offload

        return cpu_offload(reference, execution_device=accelerator.device)
    return reference.to(accelerator.device)
