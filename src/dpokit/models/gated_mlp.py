"""Gated MLPs that keep half their activations for the backward pass, with the same numbers.

A Llama-style MLP computes ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``. For the backward pass autograd keeps
four [tokens × intermediate] tensors of it: the gate (for act_fn's gradient), act_fn(gate) and up (for the
product's) and the product itself (the input of down_proj, for its weight's or adapter's gradient). The last two
are functions of the first two, so only the gate and up are kept here and act_fn(gate) · up is recomputed in the
backward pass, by the same operations on the same tensors: values and gradients are bit for bit those of the
plain module (tests/models/test_gated_mlp.py). The MLP is the widest part of a decoder layer, so this removes about a
third of what a training step keeps per token (LoRA or full fine-tuning), for two element-wise operations more
per layer in the backward pass.

Only modules whose forward is exactly that expression (Llama, Mistral, Qwen2/3, Gemma and the other models
transformers writes it for) are changed, and only while gradients are recorded: the reference pass and
evaluation run the module as written. Gradient checkpointing recomputes the whole layer anyway and is left alone.
"""

from __future__ import annotations

import functools
import inspect
import types
from dataclasses import dataclass

import torch
from torch import nn

GATED_FORWARD = "self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))"


class _GatedProduct(torch.autograd.Function):
    """act(gate) · up that saves gate and up only; act(gate) is recomputed in the backward pass."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, act) -> torch.Tensor:
        ctx.act = act
        ctx.save_for_backward(gate, up)
        return act(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        with torch.enable_grad():  # act's own backward, as autograd would have run it on the plain module
            gate_ = gate.detach().requires_grad_()
            activated = ctx.act(gate_)
        (grad_gate,) = torch.autograd.grad(activated, gate_, grad * up)
        return grad_gate, grad * activated.detach(), None


@dataclass(frozen=True)
class _Recompute:
    """Stands for a saved view of the MLP's product, rebuilt from gate and up when the backward pass needs it."""

    shape: torch.Size
    stride: tuple[int, ...]
    offset: int


def _lean_forward(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
    gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    product = _GatedProduct.apply(gate, up, mlp.act_fn)
    # plain values, not the tensor: autograd keeps the hooks as long as the graph, and they must not keep it alive
    device, storage = product.device, product.untyped_storage().data_ptr()

    def pack(saved: torch.Tensor):
        if saved.device == device and saved.untyped_storage().data_ptr() == storage:
            return _Recompute(saved.shape, saved.stride(), saved.storage_offset())
        return saved

    def unpack(packed):
        if isinstance(packed, _Recompute):
            with torch.no_grad():
                return (mlp.act_fn(gate) * up).as_strided(packed.shape, packed.stride, packed.offset)
        return packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return mlp.down_proj(product)


def is_plain_gated_mlp(module: nn.Module) -> bool:
    """Whether `module` computes exactly ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``, position by position."""
    has_parts = all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn"))
    return has_parts and _forward_is_gated_expression(type(module))


@functools.cache  # one source lookup per class, not per layer
def _forward_is_gated_expression(cls: type) -> bool:
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return GATED_FORWARD.replace(" ", "") in "".join(source.split())  # whitespace aside, that very expression


def keep_less_in_gated_mlps(model: nn.Module) -> int:
    """Make every plain gated MLP of `model` keep only its gate and up projections for the backward pass (module
    docstring). Returns how many modules were changed."""
    changed = 0
    for module in model.modules():
        if getattr(module, "_dpokit_lean", False) or not is_plain_gated_mlp(module):
            continue
        module.forward = types.MethodType(_lean_forward, module)
        module._dpokit_lean = True
        changed += 1
    return changed
