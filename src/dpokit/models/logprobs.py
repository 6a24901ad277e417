"""Model + Batch -> per-sequence log-probs of the response tokens, summed (float32).

Two ways to get from hidden states to log-probs, with the same numbers:

* ``full``: the model's own forward builds logits at every position, ``[rows x length x vocab]``, then
  log-softmax in float32 and gather: simple, and what the peers do.
* ``chunked`` (default): the decoder's hidden states are taken only at the positions that predict a
  response token, and the output layer, log-softmax and gather run over chunks of those positions inside
  one autograd function. The backward pass reuses the forward's softmax when it is small (KEEP_SOFTMAX_BYTES)
  and otherwise recomputes each chunk's logits, so no logits tensor larger than ``chunk_size x vocab`` exists
  beyond that budget, and the prompt positions cost no output-layer work at all.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from dpokit.models.attention import SEGMENTS, model_mask, sliding_window, uses_attention
from dpokit.data.batching import Batch
from dpokit.data.vision import has_vision
from dpokit.errors import DpokitWarning
from dpokit.models.last_layer import last_layer_only_at
from dpokit.models.vision import is_vision, multimodal_trunk, vision_layout_obstacle
from dpokit.data.tokenize import TokenizedExample

# Config attributes of model families that transform logits after the output layer (soft-capping,
# scaling): the chunked path would skip that step, so these models use the full path.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


# The softmax of a call's positions is kept from the forward pass for the backward when it takes at most this many
# bytes (vocabulary 8k: up to 2,048 positions), which spares the backward one output-layer matmul and one exp per
# logit; above it, the logits are recomputed chunk by chunk, so memory stays at one chunk whatever the vocabulary.
KEEP_SOFTMAX_BYTES = 64 * 2**20


class _ChunkedTargetLogProb(torch.autograd.Function):
    """log softmax(hidden @ weight.T + bias)[target], chunk by chunk; the backward reuses the forward's softmax
    when it fits in KEEP_SOFTMAX_BYTES and recomputes each chunk's logits otherwise."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk: int,
                grad_enabled: bool) -> Tensor:
        """Per-target log-probs; saves the inputs, each position's log-sum-exp and, if small, the softmax.

        `grad_enabled` is the caller's grad mode (inside forward it is always off, and ``needs_input_grad`` says
        only which inputs require gradients): a pass under ``torch.no_grad`` keeps nothing for a backward that never
        comes."""
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        keep = (grad_enabled and any(ctx.needs_input_grad[:3])
                and hidden.shape[0] * weight.shape[0] * 4 <= KEEP_SOFTMAX_BYTES)
        ctx.softmax = [] if keep else None
        for s in range(0, hidden.shape[0], chunk):
            logits = _logits(hidden[s : s + chunk], weight, bias)
            picked = logits.gather(1, targets[s : s + chunk, None]).squeeze(1)
            maxes, sums = _exp_shifted_(logits)
            lse[s : s + chunk] = sums.log().add_(maxes)
            out[s : s + chunk] = picked - lse[s : s + chunk]
            if keep:
                ctx.softmax.append(logits.div_(sums[:, None]))
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        """Gradients for hidden, weight and bias from each chunk's softmax (kept or recomputed)."""
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        kept, ctx.softmax = ctx.softmax, None  # consumed in place: a second backward (retain_graph) recomputes
        for k, s in enumerate(range(0, hidden.shape[0], ctx.chunk)):
            h = hidden[s : s + ctx.chunk]
            g = grad_out[s : s + ctx.chunk].float()
            # d logp / d logits = onehot(target) - softmax
            # in place: a chunk is [positions x vocabulary], and a fresh one per operation costs page faults
            softmax = kept[k] if kept else _logits(h, weight, bias).sub_(lse[s : s + ctx.chunk, None]).exp_()
            grad_logits = softmax.mul_(-g[:, None])
            grad_logits.scatter_add_(1, targets[s : s + ctx.chunk, None], g[:, None])
            if need_h:
                grad_h[s : s + ctx.chunk] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                grad_w += grad_logits.t() @ h.float()
            if need_b:
                grad_b += grad_logits.sum(0)
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        if need_b:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None


def _exp_shifted_(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Overwrite `logits` with exp(logits - max) per row and return (max, sum of the exps): torch.logsumexp's
    operations in its order (log(sum) + max is its result) without allocating two more tensors of the chunk's size."""
    maxes = logits.amax(dim=-1, keepdim=True)
    maxes.masked_fill_(maxes.abs() == float("inf"), 0)
    sums = logits.sub_(maxes).exp_().sum(dim=-1)
    return maxes.squeeze(-1), sums


def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    logits = hidden @ weight.to(hidden.dtype).t()
    if bias is not None:
        logits = logits + bias.to(logits.dtype)
    return logits.float()


def _chunk_target_logprobs(head: nn.Module, hidden: Tensor, targets: Tensor) -> Tensor:
    logits = head(hidden).float()
    return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


def _sharded(weight: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(weight, DTensor) or getattr(weight, "ds_id", None) is not None


def _module_target_logprobs(head: nn.Module, hidden: Tensor, targets: Tensor, chunk: int) -> Tensor:
    """The chunked path through the output layer's own forward, each chunk's logits recomputed in backward.

    For engines that gather a layer's sharded weight only inside its forward (FSDP2, DeepSpeed ZeRO-3), where
    the weight cannot be read directly. Same numbers as :class:`_ChunkedTargetLogProb`.
    """
    from torch.utils.checkpoint import checkpoint

    pieces = [checkpoint(_chunk_target_logprobs, head, hidden[s : s + chunk], targets[s : s + chunk],
                         use_reentrant=False) for s in range(0, hidden.shape[0], chunk)]
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


def supports_chunked_logits(model: nn.Module) -> bool:
    """Whether the model's logits are exactly ``output_layer(decoder(x))``, so the chunked path is exact."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear) or not hasattr(model, "get_decoder"):
        return False
    config = getattr(model, "config", None)
    return not any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS)


def _model_inputs(batch: Batch, model: nn.Module) -> dict:
    vision = batch.vision or {}
    if vision and batch.spans is None:  # plain layout: a VLM computes its own positions (Qwen2-VL's rotary ones)
        return dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False, **vision)
    inputs = dict(input_ids=batch.input_ids, attention_mask=model_mask(batch, model),
                  position_ids=batch.position_ids, use_cache=False, **vision)
    if batch.spans is not None and uses_attention(model) == SEGMENTS:
        # reaches dpokit.models.attention.segment_attention in every decoder layer (a VLM's vision tower keeps its
        # own kernel, which ignores it: dpokit.models.attention.set_attention)
        inputs["dpokit_spans"] = batch.spans
    return inputs


def _read_hidden_states(model: nn.Module, batch: Batch, inputs: dict) -> Tensor:
    """The decoder's output at the positions that predict a target token, ``[targets, hidden]``; its last layer
    does its per-token work only there (dpokit.models.last_layer)."""
    rows, length = batch.input_ids.shape
    trunk = multimodal_trunk(model) if batch.vision is not None else model.get_decoder()
    with last_layer_only_at(model, rows, length, batch.target_index):
        hidden = trunk(**inputs)[0]
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.target_index)


def token_logprobs(model: nn.Module, batch: Batch, *, chunked: bool = True, chunk_size: int = 1024) -> Tensor:
    """Log-prob (float32) of every target token of `batch`, in `batch.target_ids` order."""
    inputs = _model_inputs(batch, model)
    if chunked and supports_chunked_logits(model):
        hidden = _read_hidden_states(model, batch, inputs)
        head = model.get_output_embeddings()
        if _sharded(head.weight):  # FSDP2 and ZeRO-3 gather it in the layer's own forward hooks
            return _module_target_logprobs(head, hidden, batch.target_ids, chunk_size)
        return _ChunkedTargetLogProb.apply(hidden, head.weight, head.bias, batch.target_ids, chunk_size,
                                           torch.is_grad_enabled())
    if chunked:
        _warn_once(f"{type(model).__name__} transforms its logits after the output layer; using full logits")
    logits = model(**inputs).logits
    logits = logits.reshape(-1, logits.shape[-1]).index_select(0, batch.target_index).float()
    return torch.log_softmax(logits, dim=-1).gather(1, batch.target_ids[:, None]).squeeze(1)


def sequence_logprobs(model: nn.Module, batch: Batch, *, chunked: bool = True, chunk_size: int = 1024) -> Tensor:
    """Per-sequence sum of response-token log-probs, float32, shape ``[batch.num_sequences]``; weighted by
    ``batch.target_weights`` when the batch has them (LD-DPO)."""
    token_logps = token_logprobs(model, batch, chunked=chunked, chunk_size=chunk_size)
    if batch.target_weights is not None:
        token_logps = token_logps * batch.target_weights
    sums = torch.zeros(batch.num_sequences, dtype=torch.float32, device=token_logps.device)
    return sums.index_add(0, batch.target_seq, token_logps)


@torch.no_grad()
def sequence_alignment_logprobs(model: nn.Module, batch: Batch, *, chunked: bool = True,
                                chunk_size: int = 1024) -> Tensor:
    """WPO's per-sequence weight exponent (Zhou et al. 2024, Eq. 2, as TRL computes it): the mean over response
    tokens of ``log p(y_t) - log sum_v p(v)**2``, float32, ``[batch.num_sequences]``, without gradients.

    ``batch.target_weights`` are not applied (TRL's WPO weights use the plain per-token log-probs).
    """
    inputs = _model_inputs(batch, model)
    if chunked and supports_chunked_logits(model):
        hidden = _read_hidden_states(model, batch, inputs)
        head = model.get_output_embeddings()  # called as a module: engines gather a sharded weight in its forward
        logits_of = lambda s: head(hidden[s : s + chunk_size])  # noqa: E731
    else:
        logits = model(**inputs).logits
        logits = logits.reshape(-1, logits.shape[-1]).index_select(0, batch.target_index)
        logits_of = lambda s: logits[s : s + chunk_size]  # noqa: E731
    per_token = torch.zeros(batch.target_ids.numel(), dtype=torch.float32, device=batch.target_ids.device)
    for s in range(0, per_token.numel(), chunk_size):
        logp = torch.log_softmax(logits_of(s).float(), dim=-1)
        target = logp.gather(1, batch.target_ids[s : s + chunk_size, None]).squeeze(1)
        per_token[s : s + chunk_size] = target - torch.logsumexp(2 * logp, dim=-1)  # log p_t - log sum_v p_v^2
    sums = torch.zeros(batch.num_sequences, dtype=torch.float32, device=per_token.device)
    return sums.index_add(0, batch.target_seq, per_token) / batch.token_counts.to(per_token.device).float()


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, DpokitWarning, stacklevel=3)


@torch.no_grad()
def check_layout(scorer: nn.Module, examples: Sequence[TokenizedExample], layout: str, pad_token_id: int, *,
                 device: torch.device | str, max_length: int | None, tolerance: float = 1e-4) -> str:
    """`layout` if the model gives the plain layout's log-probs with it on a few `examples`, else "plain".

    The shared and packed layouts need a model that honours a 4-D attention mask and explicit position
    ids. Rather than keep a list of families, this asks the model itself, once, before training, through
    `scorer` (batch -> log-probs; the engine-wrapped policy, so every process takes part in the check).
    When the model attends within a sliding window and sequences may be longer than it (`max_length`, prompt +
    response; None: unknown), the check adds an example that crosses the window: the few short examples would
    not show whether the layout's masks apply it. For a vision-language model what is known to rule the layout
    out comes first (dpokit.models.vision.vision_layout_obstacle: Qwen2-VL's positions), then the same comparison
    on image pairs, whose prompts and images the layout gives once per pair.
    """
    from dpokit.data.batching import collate

    if layout == "plain":
        return layout
    sample = list(examples[:4])
    obstacle = vision_layout_obstacle(scorer, sample) if has_vision(sample) or is_vision(scorer) else None
    if obstacle is not None:
        _warn_once(f"{_model_name(scorer)} does not support the {layout} layout with images ({obstacle}); "
                   "using the plain layout")
        return "plain"
    window = sliding_window(scorer)
    crossing = window is not None and (max_length is None or max_length > window)
    if crossing:
        sample.append(_example_past(window, sample))
    ids = list(range(len(sample)))
    was_training = scorer.training
    scorer.eval()
    try:
        plain = scorer(collate(sample, ids, layout="plain", pad_token_id=pad_token_id).to(device))
        other = scorer(collate(sample, ids, layout=layout, pad_token_id=pad_token_id).to(device))
        error = ((other - plain).abs() / plain.abs().clamp_min(1.0)).max().item()
        reason = None if error <= tolerance else f"log-probs differ by {error:.2e}" + (
            f" with an example longer than its sliding window of {window} tokens" if crossing else "")
    except Exception as exc:  # a family that rejects 4-D masks or position ids outright
        reason = f"{type(exc).__name__}: {exc}"
    finally:
        scorer.train(was_training)
    if reason is None:
        return layout
    _warn_once(f"{_model_name(scorer)} does not support the {layout} layout ({reason}); using the plain layout")
    return "plain"


def _model_name(scorer: nn.Module) -> str:
    """The class name of the transformers model inside `scorer` (under its engine, Scorer and PEFT wrappers)."""
    from transformers import PreTrainedModel

    model = next((m for m in scorer.modules() if isinstance(m, PreTrainedModel)), getattr(scorer, "model", scorer))
    return type(model).__name__


def _example_past(window: int, sample: list[TokenizedExample]) -> TokenizedExample:
    """An example of `window` + 16 tokens whose responses reach past the window, made of a seeded shuffle of
    `sample`'s tokens (varied: under one repeated token every mask gives the same numbers). Its length is not
    capped at --max-length: what it checks is whether the layout's masks apply the window at all."""
    tokens = sorted({t for e in sample for t in (*e.prompt_ids, *(t for r in e.responses for t in r))}) or [0]
    length = window + 16
    prompt, responses = length // 2, len(sample[0].responses) if sample else 2
    rng = random.Random(0)
    pick = lambda n: tuple(rng.choice(tokens) for _ in range(n))  # noqa: E731
    return TokenizedExample(pick(prompt), tuple(pick(length - prompt) for _ in range(responses)), "window check")
