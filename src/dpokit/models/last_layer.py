"""The last decoder layer's per-token work, done only at the positions whose hidden states are read.

dpokit's chunked path (dpokit.models.logprobs) reads the decoder's output only where a position predicts a response
token: not at the prompt (but its last token), not at a response's last token, not at padding. Every layer but the
last must still run at every position, because later layers attend to it. Nothing attends to the last layer's
output, so the parts of that layer that act on each position alone and come after attention (the attention's
output projection and the MLP: about four fifths of a Llama layer's weights) need to run only at the read
positions. There they get the same inputs and give the same outputs as before; elsewhere their outputs are zeros,
which leaves hidden states that nothing reads. At prompts of ~45% of a pair's tokens that is ~40% of the last
layer's linear work, in the policy's forward and backward passes and in the reference's forward.

It is done with forward hooks that exist only inside :func:`last_layer_only_at`, so the modules, their names and
their state dicts stay the model's own, and every engine's hooks (FSDP2, ZeRO-3) run as before. It applies to
Llama-style layers (``self_attn.o_proj`` and a gated ``mlp``, as dpokit.models.gated_mlp recognises it), and not under
gradient checkpointing, which runs the layer again in the backward pass, outside the block.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from dpokit.models.gated_mlp import is_plain_gated_mlp


def per_token_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of `model`'s last decoder layer that may run at the read positions only: its attention's output
    projection (a linear layer, or a PEFT/quantized layer around one) and its MLP, if it is a plain gated one.
    Empty for other architectures and when that layer is recomputed by gradient checkpointing."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return []
    last = layers[-1]
    if getattr(last, "gradient_checkpointing", False):
        return []
    found = []
    o_proj = getattr(getattr(last, "self_attn", None), "o_proj", None)
    if isinstance(o_proj, nn.Linear) or isinstance(getattr(o_proj, "base_layer", None), nn.Linear):
        found.append(o_proj)
    mlp = getattr(last, "mlp", None)
    if mlp is not None and is_plain_gated_mlp(mlp):
        found.append(mlp)
    return found


@contextmanager
def last_layer_only_at(model: nn.Module, rows: int, length: int, positions: Tensor) -> Iterator[None]:
    """Inside the block, the per-token modules of `model`'s last decoder layer (:func:`per_token_modules`) run only
    at `positions`: flat indices into ``[rows * length]``, the shape of the decoder's input. An input of any other
    shape passes through unchanged."""
    modules = per_token_modules(model)
    if not modules:
        yield
        return
    positions = torch.unique(positions)  # two responses read their prompt's last position: once is enough
    selected: set[int] = set()  # the modules whose input was narrowed, so that their output is widened back

    def select(module: nn.Module, args: tuple):
        x = args[0]
        if x.dim() != 3 or x.shape[:2] != (rows, length):
            return None
        selected.add(id(module))
        return (x.reshape(rows * length, x.shape[-1]).index_select(0, positions.to(x.device)), *args[1:])

    def scatter(module: nn.Module, args: tuple, output: Tensor):
        if id(module) not in selected:
            return None
        selected.discard(id(module))
        full = output.new_zeros(rows * length, output.shape[-1])
        return full.index_copy(0, positions.to(output.device), output).view(rows, length, output.shape[-1])

    handles = []
    try:
        for module in modules:
            handles.append(module.register_forward_pre_hook(select))
            handles.append(module.register_forward_hook(scatter))
        yield
    finally:
        for handle in handles:
            handle.remove()
