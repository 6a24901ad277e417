"""TR-DPO's moving reference (Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good Alignment").

Every ``--sync-ref-every`` N optimizer steps the resident reference model moves toward the policy:

    π_ref <- α·π_θ + (1 − α)·π_ref        (parameter by parameter; α = ``--ref-mixup-alpha``, 1 = a hard copy)

as TRL's ``SyncRefModelCallback`` does after the step whose global step is a multiple of N. The reference is
then part of the run's state: every checkpoint stores it (``reference.safetensors``, written inside the
checkpoint's temporary directory, so atomically with the rest) and ``--resume`` loads it back, so a resumed run
ends with the same weights as an uninterrupted one.

Under DDP every process holds a full copy of the policy and of the reference and updates its own copy with the
same numbers, so the copies stay identical without any communication. Under FSDP2 the policy and the reference
are sharded alike (every weight split along its first dimension over the same processes), so each process mixes
its own shards, again without communication; only saving gathers the reference and loading re-shards it.
DeepSpeed is refused up front (:func:`check_sync_engine`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor

from dpokit.train.engine import Scorer, engine_name
from dpokit.errors import ConfigError

STATE_FILE = "reference.safetensors"
ENGINES = ("single", "ddp", "fsdp2")


def check_sync_engine(accelerator: Accelerator) -> None:
    """Refuse --sync-ref-every under DeepSpeed, whose partitioned weights dpokit does not mix (DDP and FSDP2 it does)."""
    name = engine_name(accelerator)
    if name not in ENGINES:
        raise ConfigError(f"--sync-ref-every under {name} is not supported (DeepSpeed keeps the policy's weights in "
                          "its own partitions): launch with DDP or FSDP2 (configs/accelerate/ddp.yaml, fsdp2.yaml) "
                          "or one process")


def paired_parameters(reference: nn.Module, policy: nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, reference parameter, policy parameter) for every parameter, matched by name; a ConfigError if the
    two models' parameters differ in names or shapes (a --ref-model of another architecture)."""
    ref, pol = dict(reference.named_parameters()), dict(policy.named_parameters())
    if ref.keys() != pol.keys():
        extra, missing = sorted(ref.keys() - pol.keys()), sorted(pol.keys() - ref.keys())
        raise ConfigError(f"--sync-ref-every: the reference's weights do not match the policy's (only in the "
                          f"reference: {extra[:3]}; only in the policy: {missing[:3]}); use a --ref-model of the "
                          "policy's architecture")
    shapes = [name for name in ref if ref[name].shape != pol[name].shape]
    if shapes:
        name = shapes[0]
        raise ConfigError(f"--sync-ref-every: the reference's {name} has shape {tuple(ref[name].shape)}, the "
                          f"policy's {tuple(pol[name].shape)}; use a --ref-model of the policy's architecture")
    return [(name, ref[name], pol[name]) for name in sorted(ref)]


@torch.no_grad()
def mix_weights_(pairs: list[tuple[str, torch.Tensor, torch.Tensor]], alpha: float) -> None:
    """In place: every reference parameter r <- α·p + (1 − α)·r, with p the policy's (computed in float32 and
    stored in the reference's dtype; α = 1 copies p exactly)."""
    for _, ref, pol in pairs:
        ref, pol = _local(ref), _local(pol)
        source = pol.detach().to(device=ref.device, dtype=torch.float32)
        mixed = source if alpha == 1 else torch.lerp(ref.detach().float(), source, alpha)
        ref.copy_(mixed)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of an FSDP2 weight (a DTensor; its storage, not a copy), or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _layout(tensor: torch.Tensor) -> tuple | None:
    """How a weight is split over processes: its placements and the ranks of its mesh (None: not split)."""
    if not isinstance(tensor, DTensor):
        return None
    return tuple(tensor.placements), tensor.device_mesh.mesh.tolist()


def _resharded(module: nn.Module) -> nn.Module:
    """`module` with every FSDP2 unit sharded: FSDP2 leaves the root's weights gathered after a forward pass
    without backward (the reference's), and a gathered unit's named_parameters are not its sharded weights."""
    for unit in module.modules():
        if isinstance(unit, FSDPModule):
            unit.reshard()
    return module


class MovingReference:
    """The resident reference of a TR-DPO run: moved toward the policy every `every` steps, saved and restored
    with the run's checkpoints. `reference` and `policy` are modules whose parameter names match (the reference's
    Scorer and the policy's, unwrapped from DDP; FSDP2 wraps in place)."""

    def __init__(self, reference: nn.Module, policy: nn.Module, every: int, alpha: float) -> None:
        self.reference, self.policy = reference, policy
        # the file's keys are the Hugging Face model's own names, as in model.safetensors
        self.prefix = "model." if isinstance(reference, Scorer) else ""
        self.every = every
        self.alpha = alpha
        self.pairs()  # a mismatch is refused before the first step

    def pairs(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """The matched parameters, as the sharded weights under FSDP2 (looked up each time: FSDP2 swaps a
        unit's registered parameters between its sharded and gathered ones)."""
        pairs = paired_parameters(_resharded(self.reference), _resharded(self.policy))
        for name, ref, pol in pairs:
            if _layout(ref) != _layout(pol):
                raise ConfigError(f"--sync-ref-every: the reference's {name} is not sharded like the policy's "
                                  f"({_layout(ref)} and {_layout(pol)})")
        return pairs

    def after_step(self, step: int) -> bool:
        """Called after optimizer step `step` (1-based) by every process: mix if it is a multiple of `every`;
        whether it did."""
        if step % self.every:
            return False
        mix_weights_(self.pairs(), self.alpha)
        return True

    def state(self) -> dict[str, torch.Tensor]:
        """The reference's full weights on the CPU (every process must call it: FSDP2 gathers the shards)."""
        return {name.removeprefix(self.prefix): (ref.full_tensor() if isinstance(ref, DTensor) else ref.detach())
                .to("cpu", copy=True).contiguous() for name, ref, _ in self.pairs()}

    def save(self, directory: Path, state: dict[str, torch.Tensor]) -> None:
        """Write `state` (from :meth:`state`) to ``directory/reference.safetensors``; the caller makes it atomic
        (a checkpoint's temporary directory)."""
        save_file(state, str(Path(directory) / STATE_FILE), metadata={"every": str(self.every),
                                                                       "alpha": repr(self.alpha)})

    @torch.no_grad()
    def load(self, checkpoint: Path) -> None:
        """Restore the reference's weights from a checkpoint written by :meth:`save`, exactly (every process reads
        the file and keeps its own shards)."""
        path = Path(checkpoint) / STATE_FILE
        if not path.is_file():
            raise ConfigError(f"--resume: {checkpoint} holds no {STATE_FILE} (the moving reference of a "
                              "--sync-ref-every run); resume the run with the options it was started with")
        tensors = load_file(str(path))
        pairs = self.pairs()
        if tensors.keys() != {name.removeprefix(self.prefix) for name, _, _ in pairs}:
            raise ConfigError(f"--resume: {path} does not match the reference model's weights")
        for name, ref, _ in pairs:
            value = tensors[name.removeprefix(self.prefix)].to(_local(ref).device)
            if isinstance(ref, DTensor):
                value = distribute_tensor(value, ref.device_mesh, ref.placements, src_data_rank=None)
            ref.copy_(value)
