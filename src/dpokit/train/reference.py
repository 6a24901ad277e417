"""The reference policy π_ref: a frozen model, the policy's own base weights (LoRA), or its log-probs
computed once (by all processes, each on its share) and cached on disk.

The cache is keyed by a fingerprint of everything the numbers depend on: the reference weights (every
tensor's bytes, dtype and shape), the tokenizer's vocabulary and special tokens, the exact token ids of every
example (which covers the data and every tokenisation setting), the image inputs of image examples (the
pixel values the processor gave: an image's tokens do not change with its pixels) and how log-probs are
computed. Change any of them and the fingerprint changes, so a stale cache can never be used silently.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from dpokit.data.batching import Batch, collate
from dpokit.train.engine import Scorer
from dpokit.errors import TrainingError
from dpokit.train.rundir import apply_umask, disk_full
from dpokit.data.sharded import examples_digest
from dpokit.data.tokenize import TokenizedExample
from dpokit.data.vision import has_vision, vision_digest

CACHE_FORMAT = 1


class ModelReference:
    """Reference log-probs from a frozen model (a Scorer placed by the engine, or a bare causal LM)."""

    def __init__(self, model: nn.Module, *, chunked: bool = True) -> None:
        if not isinstance(model, Scorer) and not hasattr(model, "module"):  # a bare model, or one an engine wrapped
            model = Scorer(model, chunked=chunked)
        model.eval()  # not chained: DeepSpeed's engine returns None from eval()
        model.requires_grad_(False)
        self.model = model

    @torch.no_grad()
    def __call__(self, batch: Batch, policy: nn.Module | None = None) -> Tensor:
        """Per-sequence reference log-probs of `batch`, float32."""
        return self.model(batch)


class PolicyReference:
    """The reference inside the policy's own weights: the base model with its LoRA adapter disabled, or a frozen
    second adapter. Scored through the engine-wrapped policy, so sharded weights are gathered as for training."""

    @torch.no_grad()
    def __call__(self, batch: Batch, policy: nn.Module) -> Tensor:
        """Per-sequence reference log-probs of `batch`, float32."""
        return policy(batch, reference=True)


class CachedReference:
    """Reference log-probs looked up by example id in a precomputed ``[examples, responses]`` table."""

    def __init__(self, table: Tensor) -> None:
        self.table = table

    def __call__(self, batch: Batch, policy: nn.Module | None = None) -> Tensor:
        """Per-sequence reference log-probs of `batch`, float32."""
        ids = batch.example_ids.to(self.table.device)
        return self.table.index_select(0, ids).reshape(-1).to(batch.input_ids.device)


def _hash_tensor(digest, name: str, tensor: Tensor) -> None:
    tensor = tensor.detach().cpu().contiguous()
    digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
    digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")


def weights_digest(model: nn.Module, skip: Callable[[str], bool] = lambda name: False) -> str:
    """A hex digest of every weight tensor's name, dtype, shape and bytes (the expensive part of a fingerprint).

    `skip` leaves out weights the reference does not depend on (a LoRA run's trained adapter).
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict(keep_vars=True).items()):
        if skip(name):
            continue
        if getattr(tensor, "ds_id", None) is not None:  # partitioned by DeepSpeed ZeRO-3 at load: gather it
            import deepspeed

            with deepspeed.zero.GatheredParameters([tensor]):
                _hash_tensor(digest, name, tensor.data)
        else:
            _hash_tensor(digest, name, tensor.detach())
    return digest.hexdigest()


def fingerprint(weights: str, tokenizer: PreTrainedTokenizerBase, examples: Sequence[TokenizedExample],
                settings: dict) -> str:
    """A hex digest of the reference weights' digest, the tokenizer, every token id and the log-prob settings."""
    digest = hashlib.sha256(f"dpokit-ref-cache-v{CACHE_FORMAT}|{weights}".encode())
    vocab = sorted(tokenizer.get_vocab().items())
    digest.update(json.dumps([vocab, tokenizer.all_special_tokens]).encode())
    digest.update(examples_digest(examples).encode())
    if has_vision(examples):  # an image's tokens are the same whatever its pixels: its inputs are keyed too
        digest.update(vision_digest(examples).encode())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


@torch.no_grad()
def compute_reference_logps(
    reference: Callable[[Batch], Tensor],
    examples: Sequence[TokenizedExample],
    *,
    batch_size: int,
    layout: str,
    pad_token_id: int,
    accelerator: Accelerator | None = None,
    device: torch.device | str = "cpu",
    description: str = "reference log-probs",
) -> Tensor:
    """Reference log-probs of every example, as an ``[examples, responses]`` float32 table.

    With several processes each scores its share (longest first, dealt round-robin so the shares are alike)
    and the table is summed across processes once: every row is filled by exactly one process and is zero
    elsewhere, so the sum is exact. All processes run the same number of batches (a process whose share has
    run out scores a stand-in and discards it), since under FSDP2 and ZeRO-3 every forward is a collective.
    """
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = accelerator.device if accelerator else device
    # Longest first, so that batches hold examples of similar length and waste little padding.
    order = sorted(range(len(examples)), key=lambda i: -examples[i].length)
    mine = order[rank::world]
    rounds = math.ceil(math.ceil(len(examples) / world) / batch_size)
    table = torch.zeros(len(examples), len(examples[0].responses), dtype=torch.float32, device=device)
    for k in tqdm(range(rounds), desc=description, unit="batch", disable=rank != 0):
        ids = mine[k * batch_size : (k + 1) * batch_size]
        real = bool(ids)
        ids = ids or order[:1]
        batch = collate([examples[i] for i in ids], ids, layout=layout, pad_token_id=pad_token_id).to(device)
        values = reference(batch).reshape(len(ids), -1).float()
        if real:
            table[ids] = values
    if world > 1:
        table = accelerator.reduce(table, reduction="sum")
    return table.cpu()


def cached_reference_logps(
    reference: Callable[[Batch], Tensor],
    weights: str,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[TokenizedExample],
    cache_dir: str | Path,
    *,
    batch_size: int,
    layout: str,
    chunked: bool,
    accelerator: Accelerator | None = None,
    device: torch.device | str = "cpu",
    description: str = "reference log-probs",
    log=print,
) -> tuple[Tensor, Path, bool]:
    """Load the reference log-prob table from `cache_dir`, or compute it with `reference` and store it.

    `weights` is the reference weights' :func:`weights_digest`. With several processes, the table is
    reused only if every process finds it; otherwise all compute it together and the main process writes it.
    Returns the table, the cache file and whether it was reused.
    """
    key = fingerprint(weights, tokenizer, examples, {"chunked": chunked})
    path = Path(cache_dir) / f"{key}.safetensors"
    table = None
    if path.exists():
        table = load_file(str(path))["logps"]
        table = table if table.shape[0] == len(examples) else None
    if accelerator is not None and accelerator.num_processes > 1:
        found = accelerator.reduce(torch.tensor(int(table is not None), device=accelerator.device), reduction="sum")
        table = table if int(found) == accelerator.num_processes else None
    if table is not None:
        log(f"reference log-probs: reusing {path}")
        return table, path, True
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    table = compute_reference_logps(reference, examples, batch_size=batch_size, layout=layout, pad_token_id=pad,
                                    accelerator=accelerator, device=device, description=description)
    if accelerator is None or accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(handle)
        try:
            save_file({"logps": table.contiguous()}, tmp, metadata={"fingerprint": key, "examples": str(len(examples))})
        except Exception as error:
            os.unlink(tmp)
            if disk_full(error):
                raise TrainingError(f"{path}: no space left on the device for the reference log-probs") from None
            raise
        os.replace(tmp, path)
        apply_umask(path)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    log(f"reference log-probs: computed for {len(examples)} examples, cached in {path}")
    return table, path, False
