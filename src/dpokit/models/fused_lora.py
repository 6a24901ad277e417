"""LoRA linear layers as one autograd function: the adapter's update added inside the base layer's matmul.

peft computes a LoRA layer as ``base(x) + lora_B(lora_A(x)) * scaling``: besides the two thin matmuls of the
adapter, that is a multiplication and an addition over the whole ``[tokens x out]`` output in the forward pass, and
again a multiplication and an addition of that size in the backward pass, each a pass over memory as large as the
layer's output. Measured on one CPU thread at 1,760 tokens (`python bench/bench_fused_lora.py`), peft's adapter
added 15-24% to the frozen layer's own forward and backward time, this one 9-18% (bench/README.md).

Here the base output takes the adapter's product in place (``addmm_`` with ``alpha=scaling``), and the backward
pass computes the input's gradient the same way (``(grad @ W).addmm_(grad_down, A)``): the same matmuls, no
activation-sized element-wise pass. The values are peft's up to float rounding (bit for bit when ``scaling`` is a
power of two; tests/models/test_fused_lora.py compares outputs and gradients).

Only the plain case runs this way: one active adapter, no dropout in effect, no DoRA or other variant, not merged,
a frozen ``nn.Linear`` base whose weight, input and adapter share one dtype, no autocast, and parameters that are
ordinary tensors (not DTensor shards of FSDP2 that are not gathered, not ZeRO-3 partitions, which DeepSpeed gathers
only when the submodule itself is called). Everything else, including the reference pass with the adapter
disabled, runs peft's own forward.
"""

from __future__ import annotations

import types

import torch
from torch import Tensor, nn


class _LoraLinear(torch.autograd.Function):
    """``x @ W.T (+ bias) + scaling * (x @ A.T) @ B.T`` with a frozen W; saves x and the [tokens x r] x @ A.T."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
                scaling: float) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        down = flat @ lora_a.t()
        out = flat @ weight.t() if bias is None else torch.addmm(bias, flat, weight.t())
        out.addmm_(down, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(flat, down, weight, lora_a, lora_b)
        ctx.scaling, ctx.input_shape = scaling, x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad: Tensor):
        flat, down, weight, lora_a, lora_b = ctx.saved_tensors
        grad = grad.reshape(-1, grad.shape[-1])
        grad_down = (grad @ lora_b).mul_(ctx.scaling)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight).addmm_(grad_down, lora_a).view(ctx.input_shape)
        if ctx.needs_input_grad[3]:
            grad_a = grad_down.t() @ flat
        if ctx.needs_input_grad[4]:
            grad_b = (down.t() @ grad).t().mul_(ctx.scaling)  # this operand order runs faster than grad.t() @ down
        return grad_x, None, None, grad_a, grad_b, None


def _is_plain_tensor(tensor: Tensor | None) -> bool:
    from torch.distributed.tensor import DTensor

    return tensor is None or (not isinstance(tensor, DTensor) and not hasattr(tensor, "ds_id"))


def _fusable(layer: nn.Module, x: Tensor, args: tuple, kwargs: dict) -> str | None:
    """The active adapter's name when `layer` can run as one _LoraLinear call on `x`; None otherwise."""
    if args or kwargs or layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return None
    base, lora_a, lora_b = layer.base_layer, layer.lora_A[name], layer.lora_B[name]
    dropout = layer.lora_dropout[name]
    if not isinstance(dropout, nn.Identity) and dropout.training and dropout.p > 0:
        return None
    if lora_b.bias is not None or base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return None
    tensors = (x, base.weight, lora_a.weight, lora_b.weight)
    if len({t.dtype for t in tensors}) != 1 or len({t.device for t in tensors}) != 1:
        return None
    if torch.is_autocast_enabled(x.device.type):
        return None
    if not all(_is_plain_tensor(t) for t in (base.weight, base.bias, lora_a.weight, lora_b.weight)):
        return None
    return name


def _fused_forward(layer: nn.Module, x: Tensor, *args, **kwargs) -> Tensor:
    name = _fusable(layer, x, args, kwargs)
    if name is None:
        return layer._dpokit_peft_forward(x, *args, **kwargs)
    base = layer.base_layer
    return _LoraLinear.apply(x, base.weight, base.bias, layer.lora_A[name].weight, layer.lora_B[name].weight,
                             layer.scaling[name])


def fuse_lora_linears(model: nn.Module) -> int:
    """Run every peft LoRA layer of `model` whose base is an ``nn.Linear`` through :class:`_LoraLinear` whenever
    its case is the plain one (module docstring); returns how many layers were changed."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    changed = 0
    for module in model.modules():
        if type(module) is not LoraLinear or type(module.base_layer) is not nn.Linear:
            continue
        if hasattr(module, "_dpokit_peft_forward"):
            continue
        module._dpokit_peft_forward = module.forward
        module.forward = types.MethodType(_fused_forward, module)
        changed += 1
    return changed
