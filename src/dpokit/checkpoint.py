"""Checkpoints: a Hugging Face model directory plus the trainer's state, all safetensors/JSON, written atomically.

Layout of ``OUTPUT/checkpoint-000100/``: the model (``model.safetensors``, ``config.json``), the tokenizer,
``trainer_state.safetensors`` (optimizer tensors and RNG states) and ``trainer_state.json`` (step,
scheduler, optimizer hyper-parameters, config, metrics). The directory is written under a temporary name
and renamed into place, so a crash never leaves a half-written checkpoint that ``--resume`` would pick up.
Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch.optim.lr_scheduler import LRScheduler
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dpokit.errors import ConfigError

_NAME = re.compile(r"^checkpoint-(\d+)$")


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step in `output_dir`, if any."""
    found = []
    for path in Path(output_dir).glob("checkpoint-*"):
        match = _NAME.match(path.name)
        if match and (path / "trainer_state.json").exists():
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None


def _optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    state = optimizer.state_dict()
    for index, values in state["state"].items():
        for name, value in values.items():
            key = f"optimizer.{index}.{name}"
            if isinstance(value, torch.Tensor):
                tensors[key] = value.detach().cpu().contiguous()
            else:
                scalars[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def save_model_dir(path: str | Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                   write_extra: Callable[[Path], object] | None = None) -> Path:
    """Save `model` and `tokenizer` as a Hugging Face directory at `path`, atomically.

    Everything is written under ``PATH.tmp``, `write_extra(tmp_dir)` adds any further files, and the directory is
    then renamed into place, replacing an older one.
    """
    final = Path(path)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if write_extra is not None:
        write_extra(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def save_checkpoint(output_dir: str | Path, step: int, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                    optimizer: torch.optim.Optimizer, scheduler: LRScheduler, accelerator: Accelerator,
                    extra: dict) -> Path:
    """Write checkpoint-STEP atomically (main process only) and wait for every process."""
    final = Path(output_dir) / f"checkpoint-{step:06d}"

    def write_state(tmp: Path) -> None:
        tensors, optimizer_meta = _optimizer_state(optimizer)
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for i, rng in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = rng
        save_file(tensors, str(tmp / "trainer_state.safetensors"))
        state = {"step": step, "scheduler": scheduler.state_dict(), "optimizer": optimizer_meta, **extra}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1, default=str))

    if accelerator.is_main_process:
        save_model_dir(final, accelerator.unwrap_model(model), tokenizer, write_state)
    accelerator.wait_for_everyone()
    return final


def _load_weights(model, checkpoint: Path) -> None:
    index = checkpoint / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    weights = {}
    for name in files:
        weights.update(load_file(str(checkpoint / name)))
    result = model.load_state_dict(weights, strict=False)
    tied = {k for k in result.missing_keys if k.endswith("lm_head.weight") or "embed" in k}
    if result.unexpected_keys or set(result.missing_keys) - tied:
        raise RuntimeError(f"{checkpoint}: weights do not match the model "
                           f"(missing {result.missing_keys}, unexpected {result.unexpected_keys})")


def load_trainer_state(checkpoint: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       scheduler: LRScheduler, data_order: dict | None = None) -> int:
    """Restore model weights, optimizer, scheduler and RNG state from `checkpoint`; return its step.

    The data position is the step itself (each step's examples follow from the seed and the global batch), so
    a resume with another data set size, global batch or seed would silently train on a different order:
    `data_order` is compared with the checkpoint's, and a mismatch is an error.
    """
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    saved = state.get("data_order")
    if data_order is not None and saved is not None and saved != data_order:
        changed = ", ".join(f"{k} {saved.get(k)} -> {v}" for k, v in data_order.items() if saved.get(k) != v)
        raise ConfigError(f"--resume: {checkpoint} was trained with another data order ({changed}); "
                          "resume with the same data, batch sizes, processes and seed, or start a new --output")
    _load_weights(model, checkpoint)
    tensors = load_file(str(checkpoint / "trainer_state.safetensors"))
    per_param: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            per_param.setdefault(int(index), {})[name] = value
    for key, value in state["optimizer"]["scalars"].items():
        _, index, name = key.split(".", 2)
        per_param.setdefault(int(index), {})[name] = value
    # JSON turned tuple hyper-parameters (Adam's betas) into lists; give them back their type
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in group.items()}
              for group in state["optimizer"]["param_groups"]]
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    return int(state["step"])
