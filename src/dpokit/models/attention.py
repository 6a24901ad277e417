"""Which attention kernel runs the shared and packed layouts: kernels that skip the masked blocks of their masks.

The shared and packed layouts (dpokit.data.batching) give every row a block-structured mask: causal, within one
example, and a response sees the prompt and itself only. As a dense 4-D mask that structure is invisible to
SDPA, which then runs its math kernel over every (query, key) pair. FlexAttention takes the same mask as a
``BlockMask`` built from three per-token vectors and skips the blocks that are wholly masked: on CUDA that is the
fast path. On a CPU, where FlexAttention has no backward pass, ``segments`` (registered with transformers as
``dpokit_segments``) runs one SDPA call per prompt (causal) and one per response (its prompt, then itself,
causal), from the batch's spans: the same numbers, none of the masked blocks.

The masks themselves are built here too (``model_mask``), with a model's sliding attention window in them where
an example reaches past it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dpokit.data.batching import Batch
from dpokit.errors import ConfigError

ATTENTION_CHOICES = ("auto", "sdpa", "eager", "flex", "segments")
SEGMENTS = "dpokit_segments"
_HF_NAMES = {"sdpa": "sdpa", "eager": "eager", "flex": "flex_attention", "segments": SEGMENTS}
SEGMENTS_MIN_LENGTH = 1024
"""Rows shorter than this run one or two SDPA calls per example (SPLIT_MIN_PREFIX); rows this long or longer, one
per prompt and one per response. `python bench/bench_attention.py --rounds 3
--per-segment` (one thread, a loaded 2-core CPU) measured the per-segment calls 1.12-1.18x faster per
forward+backward at 1024-token rows, even at 512, and slower below 256 (per-call overhead); bench/README.md has the
table."""
SPLIT_MIN_PREFIX = 128
"""Shorter rows run one SDPA call per example (the CPU kernel computes every (query, key) pair of a call it is given
a mask for, so a call over the whole row scores each example against the others' keys too), and two when the
example's prompt has at least this many tokens: those queries see only their own causal prefix, so one call covers
that square and one the responses against the example. For the split alone, `python bench/bench_attention.py
--lengths 96,160,256,440 --widths 128,256,768 --rounds 5` (one thread; prompts 45% of the row): forward + backward
of the model 1.02-1.04x faster at 440-token rows, 0.98-1.01x at 160 and 256, whence the threshold; bench/README.md
has the table."""


def choose_attention(choice: str, device: torch.device | str, layout: str, *, training: bool = True) -> str | None:
    """The transformers ``attn_implementation`` to set for `choice`, or None to keep the model's own.

    ``auto`` is FlexAttention for the shared and packed layouts on CUDA (their masks are block-sparse) and the
    per-segment SDPA calls on a CPU (``segments``; the model's default for the plain layout). ``flex`` for training
    on a CPU is an error: torch's FlexAttention has no backward pass there (compiled or not)."""
    on_cuda = torch.device(device).type == "cuda"
    if choice == "auto":
        if layout == "plain":
            return None
        return "flex_attention" if on_cuda else SEGMENTS
    if choice == "flex" and training and not on_cuda:
        raise ConfigError("--attention flex trains on CUDA only: torch's FlexAttention has no backward pass on "
                          "CPU (it serves dpokit eval there); use --attention auto or sdpa")
    return _HF_NAMES[choice]


def set_attention(model: nn.Module, implementation: str | None) -> None:
    """Switch `model` (a transformers model, or a PEFT model around one) to `implementation` in place.

    The segments kernel is SDPA: a model that cannot run SDPA (Gemma 2, whose attention soft-caps its scores)
    keeps its own kernel, with the dense mask. A vision-language model's language model takes it, and its vision
    tower keeps its own kernel: the layouts' masks and spans describe the token rows, not the image patches. An
    implementation the model rejects is a ConfigError."""
    if implementation == SEGMENTS:
        if not _supports_sdpa(model):
            return
        _register_segments()
    if implementation is not None and uses_attention(model) != implementation:
        sub_configs = getattr(getattr(model, "config", None), "sub_configs", None) or {}
        requested = {"": implementation, "text_config": implementation} \
            if {"text_config", "vision_config"} <= set(sub_configs) else implementation
        try:
            model.set_attn_implementation(requested)
        except ValueError as exc:
            name = next((k for k, v in _HF_NAMES.items() if v == implementation), implementation)
            raise ConfigError(f"--attention {name}: {type(model).__name__} cannot run it ({exc})") from None


def _supports_sdpa(model: nn.Module) -> bool:
    from transformers import PreTrainedModel

    hf = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    return bool(getattr(hf, "_supports_sdpa", True))


def uses_attention(model: nn.Module) -> str | None:
    """The transformers attention implementation `model` runs, if it says."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None)


def block_mask(batch: Batch, window: int | None = None):
    """The FlexAttention ``BlockMask`` equal to `batch`'s dense shared/packed mask: query q may see key k when
    k ≤ q, both belong to the same example, and k is in the prompt or in q's own response; with a `window`, only
    when k is fewer than `window` positions before q."""
    from torch.nn.attention.flex_attention import create_block_mask

    example, segment, position = batch.token_example, batch.token_segment, batch.position_ids

    def may_attend(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        same_example = example[b, q] == example[b, k]
        visible = (segment[b, k] == 0) | (segment[b, k] == segment[b, q])
        allowed = (k <= q) & same_example & visible
        return allowed if window is None else allowed & (position[b, q] - position[b, k] < window)

    rows, length = example.shape
    return create_block_mask(may_attend, rows, None, length, length, device=example.device)


def model_mask(batch: Batch, model: nn.Module):
    """The attention mask to pass `model` for `batch`: the 2-D padding mask in the plain layout; otherwise the
    block mask, as a FlexAttention ``BlockMask`` when the model runs FlexAttention and as an additive float mask
    (which every attention implementation taking a 4-D mask understands) when not.

    A 4-D mask is used as given, so a model's sliding window must be in it: when some example of `batch` is
    longer than the window, the mask of the sliding layers admits only keys fewer than `window` positions back,
    and a model that mixes full and sliding layers gets one mask per layer type (transformers'
    ``{layer type: mask}`` form)."""
    if batch.attention_mask.dim() == 2:
        return batch.attention_mask
    window = sliding_window(model)
    if window is not None and _longest_sequence(batch.spans) <= window:
        window = None  # no example reaches past the window: it changes nothing (segment_attention's rule too)
    if batch.token_example is not None and uses_attention(model) == "flex_attention":
        full = block_mask(batch)
        return full if window is None else _by_layer_type(model, full, block_mask(batch, window))
    dtype = model.get_input_embeddings().weight.dtype
    full = _additive(batch.attention_mask, dtype)
    if window is None:
        return full
    position = batch.position_ids
    within = position[:, :, None] - position[:, None, :] < window
    return _by_layer_type(model, full, _additive(batch.attention_mask & within, dtype))


def _additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    blocked = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, blocked)[:, None]


def _by_layer_type(model: nn.Module, full, windowed):
    layer_types = getattr(_text_config(model), "layer_types", None)
    if layer_types is None:
        return windowed  # every layer slides (Mistral)
    return {"full_attention": full, "sliding_attention": windowed}


def _text_config(model: nn.Module):
    from transformers import PretrainedConfig

    config = next((m.config for m in model.modules() if isinstance(getattr(m, "config", None), PretrainedConfig)),
                  None)
    return config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config


def sliding_window(model: nn.Module) -> int | None:
    """The sliding attention window of `model`'s layers (from its transformers config), or None when every layer
    attends to the whole sequence."""
    config = _text_config(model)
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return int(window)


def _register_segments() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if SEGMENTS not in AttentionInterface._global_mapping:
        AttentionInterface.register(SEGMENTS, segment_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(SEGMENTS, sdpa_mask)  # generation: plain SDPA masks


def segment_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                      dropout: float = 0.0, scaling: float | None = None, dpokit_spans=None, **kwargs):
    """A transformers attention function: with ``dpokit_spans`` (Batch.spans, passed by dpokit.models.logprobs) one SDPA
    call per prompt and per response instead of one over the whole row's dense mask; for rows shorter than
    SEGMENTS_MIN_LENGTH, two calls split after the rows' common causal prefix (SPLIT_MIN_PREFIX), or one; without
    spans, transformers' SDPA attention. In a sliding-window layer (``sliding_window``) the per-segment masks
    have the window, and the short rows' dense mask has it already (model_mask).

    ``query`` is ``[rows, heads, length, dim]``, ``key``/``value`` ``[rows, kv_heads, length, dim]``; returns
    ``([rows, length, heads, dim], None)`` like transformers' own attention functions. Padding columns get zeros
    (nothing reads their hidden states)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    length = query.shape[2]
    if dpokit_spans is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    window = kwargs.get("sliding_window")
    if window and _longest_sequence(dpokit_spans) <= window:
        window = None  # a sliding layer, but no example reaches past its window: it changes nothing
    if length < SEGMENTS_MIN_LENGTH:
        if attention_mask is None:
            return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling,
                                          **kwargs)
        return _per_example(module, query, key, value, attention_mask, dpokit_spans, window, dropout, scaling,
                            kwargs), None
    sdpa = torch.nn.functional.scaled_dot_product_attention
    options = dict(scale=scaling, dropout_p=dropout if module.training else 0.0,
                   enable_gqa=query.shape[1] != key.shape[1])
    rows = []
    for r, examples in enumerate(dpokit_spans):
        pieces, used = [], 0
        for prompt_start, prompt_length, responses in examples:
            prompt = slice(prompt_start, prompt_start + prompt_length)
            prompt_key, prompt_value = key[r : r + 1, :, prompt], value[r : r + 1, :, prompt]
            if prompt_length and (window is None or prompt_length <= window):
                pieces.append(sdpa(query[r : r + 1, :, prompt], prompt_key, prompt_value, is_causal=True, **options))
            elif prompt_length:
                pieces.append(sdpa(query[r : r + 1, :, prompt], prompt_key, prompt_value,
                                   attn_mask=_visible(0, prompt_length, window, query.device), **options))
            for start, size in responses:
                span = slice(start, start + size)
                pieces.append(sdpa(query[r : r + 1, :, span], torch.cat([prompt_key, key[r : r + 1, :, span]], 2),
                                   torch.cat([prompt_value, value[r : r + 1, :, span]], 2),
                                   attn_mask=_visible(prompt_length, size, window, query.device), **options))
            used = prompt_start + prompt_length + sum(size for _, size in responses)
        if used < length:
            pieces.append(query.new_zeros(1, query.shape[1], length - used, query.shape[3]))
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


def _per_example(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, mask: Tensor, spans, window,
                 dropout: float, scaling: float | None, kwargs: dict) -> Tensor:
    """Short rows: one SDPA call per example (its prompt and responses) with the example's square of the row's mask,
    so no query is scored against another example's keys; an example whose prompt has SPLIT_MIN_PREFIX tokens or
    more runs as two calls, the prompt's plain causal square and the responses against the example."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attend(r: int, queries: slice, keys: slice, causal: bool) -> Tensor:
        options = {**kwargs, "is_causal": True} if causal else kwargs
        return sdpa_attention_forward(module, query[r : r + 1, :, queries], key[r : r + 1, :, keys],
                                      value[r : r + 1, :, keys], None if causal else mask[r : r + 1, :, queries, keys],
                                      dropout=dropout, scaling=scaling, **options)[0]

    length, rows = query.shape[2], []
    gap = lambda size: query.new_zeros(1, size, query.shape[1], query.shape[3])  # noqa: E731 (unread positions)
    for r, examples in enumerate(spans):
        pieces, used = [], 0
        for prompt_start, prompt_length, responses in examples:
            end = max([prompt_start + prompt_length] + [start + size for start, size in responses])
            if prompt_start > used:
                pieces.append(gap(prompt_start - used))
            prompt_end = prompt_start + prompt_length
            if prompt_length >= SPLIT_MIN_PREFIX and (window is None or prompt_length <= window):
                pieces.append(attend(r, slice(prompt_start, prompt_end), slice(prompt_start, prompt_end), True))
                if end > prompt_end:
                    pieces.append(attend(r, slice(prompt_end, end), slice(prompt_start, end), False))
            else:
                pieces.append(attend(r, slice(prompt_start, end), slice(prompt_start, end), False))
            used = end
        if used < length:
            pieces.append(gap(length - used))
        rows.append(torch.cat(pieces, dim=1))
    return torch.cat(rows)


def _visible(prompt_length: int, size: int, window: int | None, device) -> Tensor:
    """``[size, prompt_length + size]``: which keys (the prompt, then the segment itself) each of a segment's
    `size` queries sees: the whole prompt and itself causally, and with a `window` only keys fewer than `window`
    positions back (the segment's positions continue the prompt's)."""
    visible = torch.ones(size, prompt_length + size, dtype=torch.bool, device=device)
    visible[:, prompt_length:] = torch.ones(size, size, dtype=torch.bool, device=device).tril()
    if window is not None:
        query_position = torch.arange(prompt_length, prompt_length + size, device=device)
        key_position = torch.arange(prompt_length + size, device=device)
        visible &= query_position[:, None] - key_position[None, :] < window
    return visible


def _longest_sequence(spans) -> int:
    """Tokens in the longest prompt + response of any row."""
    return max((prompt_length + max((size for _, size in responses), default=0)
                for row in spans for _, prompt_length, responses in row), default=0)
