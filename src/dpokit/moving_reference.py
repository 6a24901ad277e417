"""TR-DPO's moving reference (Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good Alignment").

Every ``--sync-ref-every`` N optimizer steps the resident reference model moves toward the policy:

    π_ref <- α·π_θ + (1 − α)·π_ref        (parameter by parameter; α = ``--ref-mixup-alpha``, 1 = a hard copy)

as TRL's ``SyncRefModelCallback`` does after the step whose global step is a multiple of N. The reference is
then part of the run's state: every checkpoint stores it (``reference.safetensors``, written inside the
checkpoint's temporary directory, so atomically with the rest) and ``--resume`` loads it back, so a resumed run
ends with the same weights as an uninterrupted one.

Under DDP every process holds a full copy of the policy and of the reference and updates its own copy with the
same numbers, so the copies stay identical without any communication. Engines that shard parameters (FSDP2,
DeepSpeed) are refused up front (:func:`check_sync_engine`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import nn

from dpokit.engine import engine_name
from dpokit.errors import ConfigError

STATE_FILE = "reference.safetensors"
ENGINES = ("single", "ddp")


def check_sync_engine(accelerator: Accelerator) -> None:
    """Refuse --sync-ref-every under an engine whose policy parameters are not full tensors on every process."""
    name = engine_name(accelerator)
    if name not in ENGINES:
        raise ConfigError(f"--sync-ref-every under {name} is not supported: the policy's and the reference's weights "
                          "are sharded there; launch with DDP (configs/accelerate/ddp.yaml) or one process")


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
        source = pol.detach().to(device=ref.device, dtype=torch.float32)
        mixed = source if alpha == 1 else torch.lerp(ref.detach().float(), source, alpha)
        ref.copy_(mixed)


class MovingReference:
    """The resident reference of a TR-DPO run: moved toward the policy every `every` steps, saved and restored
    with the run's checkpoints."""

    def __init__(self, reference: nn.Module, policy: nn.Module, every: int, alpha: float) -> None:
        self.pairs = paired_parameters(reference, policy)
        self.every = every
        self.alpha = alpha

    def after_step(self, step: int) -> bool:
        """Called after optimizer step `step` (1-based): mix if it is a multiple of `every`; whether it did."""
        if step % self.every:
            return False
        mix_weights_(self.pairs, self.alpha)
        return True

    def save(self, directory: Path) -> None:
        """Write the reference's current weights to ``directory/reference.safetensors`` (the caller makes it
        atomic: a checkpoint's temporary directory)."""
        tensors = {name: ref.detach().to("cpu", copy=True).contiguous() for name, ref, _ in self.pairs}
        save_file(tensors, str(Path(directory) / STATE_FILE), metadata={"every": str(self.every),
                                                                         "alpha": repr(self.alpha)})

    @torch.no_grad()
    def load(self, checkpoint: Path) -> None:
        """Restore the reference's weights from a checkpoint written by :meth:`save`, exactly."""
        path = Path(checkpoint) / STATE_FILE
        if not path.is_file():
            raise ConfigError(f"--resume: {checkpoint} holds no {STATE_FILE}, the moving reference of a "
                              "--sync-ref-every run; resume it without --sync-ref-every, or start a new --output")
        tensors = load_file(str(path))
        if tensors.keys() != {name for name, _, _ in self.pairs}:
            raise ConfigError(f"--resume: {path} does not match the reference model's weights")
        for name, ref, _ in self.pairs:
            ref.copy_(tensors[name])
