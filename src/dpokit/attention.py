"""Which attention kernel runs the shared and packed layouts, and the FlexAttention block mask that lets it skip
masked blocks.

The shared and packed layouts (dpokit.batching) give every row a block-structured mask: causal, within one
example, and a response sees the prompt and itself only. As a dense 4-D mask that structure is invisible to
SDPA, which then runs its math kernel over every (query, key) pair. FlexAttention takes the same mask as a
``BlockMask`` built from three per-token vectors and skips the blocks that are wholly masked: on CUDA that is the
fast path (issue 12). On CPU, FlexAttention runs forward passes only without ``torch.compile``; the dense mask
stays the CPU default.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dpokit.batching import Batch
from dpokit.errors import ConfigError

ATTENTION_CHOICES = ("auto", "sdpa", "eager", "flex")
_HF_NAMES = {"sdpa": "sdpa", "eager": "eager", "flex": "flex_attention"}


def choose_attention(choice: str, device: torch.device | str, layout: str, *, training: bool = True) -> str | None:
    """The transformers ``attn_implementation`` to set for `choice`, or None to keep the model's own.

    ``auto`` is FlexAttention for the shared and packed layouts on CUDA (their masks are block-sparse) and the
    model's default everywhere else. ``flex`` for training on a CPU is an error: torch's FlexAttention has no
    backward pass there (compiled or not)."""
    on_cuda = torch.device(device).type == "cuda"
    if choice == "auto":
        return "flex_attention" if on_cuda and layout != "plain" else None
    if choice == "flex" and training and not on_cuda:
        raise ConfigError("--attention flex trains on CUDA only: torch's FlexAttention has no backward pass on "
                          "CPU (it serves dpokit eval there); use --attention auto or sdpa")
    return _HF_NAMES[choice]


def set_attention(model: nn.Module, implementation: str | None) -> None:
    """Switch `model` (a transformers model, or a PEFT model around one) to `implementation` in place."""
    if implementation is not None and uses_attention(model) != implementation:
        model.set_attn_implementation(implementation)


def uses_attention(model: nn.Module) -> str | None:
    """The transformers attention implementation `model` runs, if it says."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None)


def block_mask(batch: Batch):
    """The FlexAttention ``BlockMask`` equal to `batch`'s dense shared/packed mask: query q may see key k when
    k ≤ q, both belong to the same example, and k is in the prompt or in q's own response."""
    from torch.nn.attention.flex_attention import create_block_mask

    example, segment = batch.token_example, batch.token_segment

    def may_attend(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        same_example = example[b, q] == example[b, k]
        visible = (segment[b, k] == 0) | (segment[b, k] == segment[b, q])
        return (k <= q) & same_example & visible

    rows, length = example.shape
    return create_block_mask(may_attend, rows, None, length, length, device=example.device)
