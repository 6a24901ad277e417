"""The reference policy π_ref: a frozen model, or its log-probs computed once and cached on disk.

The cache is keyed by a fingerprint of everything the numbers depend on: the reference weights (every
tensor's bytes, dtype and shape), the tokenizer's vocabulary and special tokens, the exact token ids of every
example (which covers the data and every tokenisation setting) and how log-probs are computed. Change any of
them and the fingerprint changes, so a stale cache can never be used silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from dpokit.batching import Batch, collate
from dpokit.logprobs import sequence_logprobs
from dpokit.tokenize import TokenizedExample

CACHE_FORMAT = 1


class ModelReference:
    """Reference log-probs from a frozen model, computed batch by batch."""

    def __init__(self, model: nn.Module, *, chunked: bool = True) -> None:
        self.model = model.eval().requires_grad_(False)
        self.chunked = chunked

    @torch.no_grad()
    def __call__(self, batch: Batch) -> Tensor:
        """Per-sequence reference log-probs of `batch`, float32."""
        return sequence_logprobs(self.model, batch, chunked=self.chunked)


class CachedReference:
    """Reference log-probs looked up by example id in a precomputed ``[examples, responses]`` table."""

    def __init__(self, table: Tensor) -> None:
        self.table = table

    def __call__(self, batch: Batch) -> Tensor:
        """Per-sequence reference log-probs of `batch`, float32."""
        ids = batch.example_ids.to(self.table.device)
        return self.table.index_select(0, ids).reshape(-1).to(batch.input_ids.device)


def _hash_tensor(digest, name: str, tensor: Tensor) -> None:
    tensor = tensor.detach().cpu().contiguous()
    digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
    digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")


def weights_digest(model: nn.Module) -> str:
    """A hex digest of every weight tensor's name, dtype, shape and bytes (the expensive part of a fingerprint)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        _hash_tensor(digest, name, tensor)
    return digest.hexdigest()


def fingerprint(weights: str, tokenizer: PreTrainedTokenizerBase, examples: Sequence[TokenizedExample],
                settings: dict) -> str:
    """A hex digest of the reference weights' digest, the tokenizer, every token id and the log-prob settings."""
    digest = hashlib.sha256(f"dpokit-ref-cache-v{CACHE_FORMAT}|{weights}".encode())
    vocab = sorted(tokenizer.get_vocab().items())
    digest.update(json.dumps([vocab, tokenizer.all_special_tokens]).encode())
    for example in examples:
        digest.update(json.dumps([example.prompt_ids, example.responses]).encode())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


@torch.no_grad()
def compute_reference_logps(
    model: nn.Module,
    examples: Sequence[TokenizedExample],
    *,
    batch_size: int,
    layout: str,
    chunked: bool,
    pad_token_id: int,
    device: torch.device | str = "cpu",
    description: str = "reference log-probs",
) -> Tensor:
    """Reference log-probs of every example, as an ``[examples, responses]`` float32 table."""
    model.eval()
    reference = ModelReference(model, chunked=chunked)
    # Longest first, so that batches hold examples of similar length and waste little padding.
    order = sorted(range(len(examples)), key=lambda i: -examples[i].length)
    table = torch.zeros(len(examples), len(examples[0].responses), dtype=torch.float32)
    for start in tqdm(range(0, len(order), batch_size), desc=description, unit="batch"):
        ids = order[start : start + batch_size]
        batch = collate([examples[i] for i in ids], ids, layout=layout, pad_token_id=pad_token_id).to(device)
        table[ids] = reference(batch).reshape(len(ids), -1).cpu()
    return table


def cached_reference_logps(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[TokenizedExample],
    cache_dir: str | Path,
    *,
    batch_size: int,
    layout: str,
    chunked: bool,
    device: torch.device | str = "cpu",
    description: str = "reference log-probs",
    weights: str | None = None,
    log=print,
) -> tuple[Tensor, Path, bool]:
    """Load the reference log-prob table from `cache_dir`, or compute and store it.

    `weights` is the model's :func:`weights_digest`, when the caller already has it (it reads every weight).
    Returns the table, the cache file and whether it was reused.
    """
    weights = weights or weights_digest(model)
    key = fingerprint(weights, tokenizer, examples, {"chunked": chunked})
    path = Path(cache_dir) / f"{key}.safetensors"
    if path.exists():
        table = load_file(str(path))["logps"]
        if table.shape[0] == len(examples):
            log(f"reference log-probs: reusing {path}")
            return table, path, True
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    table = compute_reference_logps(
        model, examples, batch_size=batch_size, layout=layout, chunked=chunked, pad_token_id=pad,
        device=device, description=description,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(handle)
    save_file({"logps": table.contiguous()}, tmp, metadata={"fingerprint": key, "examples": str(len(examples))})
    os.replace(tmp, path)
    log(f"reference log-probs: computed for {len(examples)} examples, cached in {path}")
    return table, path, False
