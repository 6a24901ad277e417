"""Checkpoints: a Hugging Face model directory plus the trainer's state, all safetensors/JSON, written atomically.

Layout of ``OUTPUT/checkpoint-000100/``: the model (``model.safetensors``, ``config.json``), the tokenizer,
``trainer_state.safetensors`` (optimizer tensors, keyed by parameter name, and RNG states) and
``trainer_state.json`` (step, scheduler, optimizer hyper-parameters, config, metrics), and for a TR-DPO run
(``--sync-ref-every``) the moving reference's weights, ``reference.safetensors``. A LoRA run's checkpoint
holds the adapter (``adapter_model.safetensors``, ``adapter_config.json``) instead of the whole model. The directory is written under a temporary name
and renamed into place, so a crash never leaves a half-written checkpoint that ``--resume`` would pick up.
Nothing is ever unpickled, but under DeepSpeed the partitions of its optimizer state (``deepspeed/``:
train/partitions.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file
from torch.optim.lr_scheduler import LRScheduler
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dpokit.train.engine import engine_name, unwrap_optimizer
from dpokit.train.partitions import check_partitions, load_partitions, move_partitions, save_partitions
from dpokit.errors import ConfigError, TrainingError
from dpokit.train.rundir import apply_umask, disk_full, no_space_message, tensor_bytes, tree_bytes
from dpokit.data.sharded import examples_digest

_NAME = re.compile(r"^checkpoint-(\d+)$")


MANIFEST = "manifest.json"


def checkpoints(output_dir: str | Path) -> list[Path]:
    """The checkpoint directories of `output_dir` (complete-looking or not; not the .tmp ones), by step."""
    found = [(int(m.group(1)), path) for path in Path(output_dir).glob("checkpoint-*")
             if path.is_dir() and (m := _NAME.match(path.name))]
    return [path for _, path in sorted(found)]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    """Record the size and checksum of every file of `directory` (after fsyncing it) in its manifest."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        with path.open("rb") as handle:
            os.fsync(handle.fileno())
        files[str(path.relative_to(directory))] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    (directory / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def verify_checkpoint(path: Path) -> str | None:
    """None if every file of the checkpoint matches its manifest; otherwise what is wrong."""
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return "no readable manifest"
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != expected["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, its manifest says {expected['bytes']}"
        if _sha256(file) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None


def latest_checkpoint(output_dir: str | Path, log=print) -> Path | None:
    """The intact checkpoint with the highest step in `output_dir`, if any; damaged ones are reported, skipped."""
    for path in reversed(checkpoints(output_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        log(f"{path}: {problem}; skipped in favour of the previous checkpoint")
    return None


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint directory was written at."""
    return int(_NAME.match(path.name).group(1))


def prune_checkpoints(output_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` intact checkpoints (called after a newer one is complete)."""
    intact = [p for p in checkpoints(output_dir) if verify_checkpoint(p) is None]
    for path in intact[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state dict keyed by parameter name -> (safetensors tensors, JSON-able rest)."""
    tensors, scalars = {}, {}

    def put(name: str, key: str, value) -> None:
        if isinstance(value, dict):  # nested state (bitsandbytes' 8-bit optimizers): key path joined by "/"
            for inner, item in value.items():
                put(name, f"{key}/{inner}", item)
        elif isinstance(value, torch.Tensor):
            tensors[f"optimizer.{name}.{key}"] = value.detach().to("cpu", copy=True).contiguous()  # unshared
        else:
            scalars[f"{name}\t{key}"] = value

    for name, values in state["state"].items():
        for key, value in values.items():
            put(name, key, value)
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    per_param: dict[str, dict] = {}

    def put(name: str, path: str, value) -> None:
        *outer, last = path.split("/")
        target = per_param.setdefault(name, {})
        for key in outer:
            target = target.setdefault(key, {})
        target[last] = value

    for key, value in tensors.items():
        if key.startswith("optimizer."):
            name, _, field = key[len("optimizer."):].rpartition(".")
            put(name, field, value)
    for key, value in meta["scalars"].items():
        name, field = key.split("\t")
        put(name, field, value)
    # JSON turned tuple hyper-parameters (Adam's betas) into lists; give them back their type
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in group.items()}
              for group in meta["param_groups"]]
    return {"state": per_param, "param_groups": groups}


def _is_adapter(model) -> bool:
    return hasattr(model, "peft_config")


def _bytes_needed(final: Path, model, state_dict: dict | None, extra_bytes: int) -> tuple[int, str]:
    """About how many bytes writing `final` takes, and how that was estimated: the newest checkpoint before it
    (one of the same run holds the same files), or else the weights to write and `extra_bytes` (optimizer state)."""
    previous = [p for p in checkpoints(final.parent) if p != final] if _NAME.match(final.name) else []
    if previous:
        return tree_bytes(previous[-1]), f"the size of {previous[-1].name}"
    weights = tensor_bytes(p for p in model.parameters() if p.requires_grad) if _is_adapter(model) else \
        tensor_bytes((state_dict if state_dict is not None else model.state_dict()).values())
    return weights + extra_bytes, "the weights and the optimizer's state" if extra_bytes else "the size of the weights"


def save_model_dir(path: str | Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                   write_extra: Callable[[Path], object] | None = None, state_dict: dict | None = None,
                   extra_bytes: int = 0) -> Path:
    """Save `model` and `tokenizer` as a Hugging Face directory at `path`, atomically.

    A PEFT model is saved as its trained adapter only (``adapter_config.json``, ``adapter_model.safetensors``;
    `PeftModel.from_pretrained` loads it). `state_dict` is the model's full state when an engine holds it in
    shards. Everything is written under ``PATH.tmp``, `write_extra(tmp_dir)` adds any further files, and the
    directory is then renamed into place, replacing an older one. A full device is a one-line TrainingError
    naming the bytes needed (`extra_bytes`: what `write_extra` adds to the weights, for the estimate).
    """
    final = Path(path)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if _is_adapter(model):
            model.save_pretrained(tmp, state_dict=state_dict, selected_adapters=["default"])
        else:
            model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if write_extra is not None:
            write_extra(tmp)
    except Exception as error:
        shutil.rmtree(tmp, ignore_errors=True)  # give the space back; what was saved before stays intact
        if disk_full(error):  # whichever file it was: weights, tokenizer, trainer state or manifest
            raise TrainingError(no_space_message(final, *_bytes_needed(final, model, state_dict, extra_bytes))) \
                from None
        raise
    apply_umask(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def gather_weights(engine) -> dict:
    """The policy's full state on the main process (every process takes part; FSDP2 and ZeRO-3 gather their
    shards; the others get an empty dict under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if engine.accelerator.distributed_type == DistributedType.DEEPSPEED:
        return _strip_prefix(engine.accelerator.get_state_dict(engine.scorer))
    return _strip_prefix(get_model_state_dict(engine.scorer, options=StateDictOptions(full_state_dict=True,
                                                                                       cpu_offload=True)))


def save_final(path: str | Path, engine, tokenizer: PreTrainedTokenizerBase,
               write_extra: Callable[[Path], object] | None = None) -> Path:
    """Save the trained policy (the adapter, for LoRA) as a Hugging Face directory at `path`, atomically."""
    weights = gather_weights(engine)
    if engine.accelerator.is_main_process:
        save_model_dir(path, engine.model, tokenizer, write_extra, state_dict=weights)
    engine.accelerator.wait_for_everyone()
    return Path(path)


def save_checkpoint(output_dir: str | Path, step: int, engine, tokenizer: PreTrainedTokenizerBase,
                    extra: dict) -> Path:
    """Write checkpoint-STEP atomically: every process gathers its shards, the main process writes.

    Under DeepSpeed every process also writes its partitions of the optimizer state (train/partitions.py).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    accelerator = engine.accelerator
    final = Path(output_dir) / f"checkpoint-{step:06d}"
    weights = gather_weights(engine)
    moving = getattr(engine, "moving_reference", None)
    reference_state = moving.state() if moving is not None else None  # every process: FSDP2 gathers
    optimizer_state, staging = None, None
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        staging = save_partitions(engine.scorer, final, accelerator)
    else:
        optimizer_state = get_optimizer_state_dict(engine.scorer, unwrap_optimizer(engine.optimizer),
                                                   options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def write_state(tmp: Path) -> None:
        tensors, optimizer_meta = _flatten_optimizer(optimizer_state) if optimizer_state else ({}, None)
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for i, rng in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = rng
        save_file(tensors, str(tmp / "trainer_state.safetensors"))
        state = {"step": step, "scheduler": engine.scheduler.state_dict(), "optimizer": optimizer_meta,
                 "resumable": True, **extra}
        if staging is not None:  # the partitions fit this engine and process count only
            move_partitions(staging, tmp)
            state.update(engine=engine_name(accelerator), processes=accelerator.num_processes)
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1, default=str))
        if reference_state is not None:  # TR-DPO: the reference is run state too
            engine.moving_reference.save(tmp, reference_state)
        write_manifest(tmp)  # last: a checkpoint whose files do not all match it is skipped on resume

    if accelerator.is_main_process:
        try:
            save_model_dir(final, engine.model, tokenizer, write_state, state_dict=weights, extra_bytes=tensor_bytes(
                v for state in (optimizer_state or {}).get("state", {}).values() for v in state.values()))
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _strip_prefix(state_dict: dict, prefix: str = "model.") -> dict:
    """Scorer's state keys (``model.`` + the wrapped model's own) -> the wrapped model's keys."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in (state_dict or {}).items()}


def _own_names(model) -> dict[str, str]:
    """The name save_pretrained writes each of `model`'s weights under -> the model's own name, where they differ.

    Why: transformers saves some models under their checkpoint format's names, reverting the renamings it applied
    when it loaded them (a LLaVA's ``model.language_model.*`` as ``language_model.model.*``, as the Hub's LLaVA
    checkpoints name them); load_state_dict needs the model's own. The reverted names are those save_pretrained
    computes (transformers' revert_weight_conversion), followed weight by weight; a weight that a conversion
    splits or merges instead of renaming keeps its name (and load_model_weights then names it as missing)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # a transformers that saves under the model's own names
        return {}
    placeholders = {name: torch.empty(0, device="meta") for name in model.state_dict()}
    owner = {id(tensor): name for name, tensor in placeholders.items()}
    try:
        saved = revert_weight_conversion(model, dict(placeholders))
    except (ValueError, RuntimeError, NotImplementedError):
        return {}
    return {name: owner[id(tensor)] for name, tensor in saved.items()
            if id(tensor) in owner and owner[id(tensor)] != name}


def load_model_weights(model, checkpoint: Path) -> None:
    """Load a checkpoint's weights (a full model, or a PEFT adapter) into `model`, before an engine wraps it."""
    if _is_adapter(model):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(str(checkpoint / "adapter_model.safetensors")),
                                           adapter_name="default")
        if getattr(result, "unexpected_keys", None):
            raise ConfigError(f"{checkpoint}: the adapter does not match the model ({result.unexpected_keys[:3]}...)")
        return
    index = checkpoint / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    weights = {}
    for name in files:
        weights.update(load_file(str(checkpoint / name)))
    own = _own_names(model)
    result = model.load_state_dict({own.get(k, k): v for k, v in weights.items()}, strict=False)
    tied = {k for k in result.missing_keys if k.endswith("lm_head.weight") or "embed" in k}
    if result.unexpected_keys or set(result.missing_keys) - tied:
        raise ConfigError(f"{checkpoint}: weights do not match the model "
                          f"(missing {result.missing_keys}, unexpected {result.unexpected_keys})")


# Options a resumed run may change: where and how often it reports, saves and stops; not what it computes.
FREE_OPTIONS = {"resume", "overwrite", "output", "max_steps", "epochs", "early_stopping_patience", "eval_every",
                "save_every", "save_every_minutes", "keep_checkpoints", "log_every", "save_final", "eval_batch_size",
                "ref_cache_dir", "data_cache", "data_cache_dir", "streaming", "threads"}


def run_identity(config: dict, examples, model: str) -> dict:
    """What makes a run this run: its options (but FREE_OPTIONS), a digest of its tokenised training data, and
    of its starting model (the path, its config and the names and sizes of its weight files). The data digest
    (examples_digest) is the same for the in-memory examples and the --streaming ones, so either may resume the
    other."""
    weights = hashlib.sha256(model.encode())
    root = Path(model)
    if root.is_dir():
        for path in sorted(root.iterdir()):
            if path.name in ("config.json", "adapter_config.json"):
                weights.update(path.read_bytes())
            elif path.suffix in (".safetensors", ".gguf"):
                weights.update(f"{path.name}:{path.stat().st_size}".encode())
    return {"config": {k: v for k, v in sorted(config.items()) if k not in FREE_OPTIONS},
            "data": examples_digest(examples), "model": weights.hexdigest()}


def _options_added_since(saved: dict, current: dict) -> dict:
    """The options of `current` that a checkpoint's `saved` options lack and that hold their defaults: options a
    later dpokit added, which change nothing at their defaults, so that a run of an older release resumes."""
    import dataclasses

    from dpokit.config import TrainConfig

    defaults = {f.name: json.loads(json.dumps(f.default, default=str)) for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in current.items() if k not in saved and k in defaults and defaults[k] == v}


def check_resumable(checkpoint: Path, data_order: dict, engine: str, identity: dict | None = None,
                    processes: int | None = None) -> None:
    """Refuse to resume from a checkpoint of another run (config, data or model), into another data order, from
    one that holds no optimizer state, or across DeepSpeed and another engine, stage or process count.

    The data position is the step itself (each step's examples follow from the seed and the global batch), so
    a resume with another data set size, global batch or seed would silently train on a different order.
    """
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    saved = state.get("data_order")
    if saved is not None and saved != data_order:
        changed = ", ".join(f"{k} {saved.get(k)} -> {v}" for k, v in data_order.items() if saved.get(k) != v)
        raise ConfigError(f"--resume: {checkpoint} was trained with another data order ({changed}); "
                          "resume with the same data, batch sizes, processes and seed, or start a new --output")
    saved_identity = state.get("identity")
    if identity is not None and saved_identity is not None:
        saved_identity = dict(saved_identity, config={**_options_added_since(saved_identity["config"], identity["config"]),
                                                      **saved_identity["config"]})
    if identity is not None and saved_identity is not None and saved_identity != identity:
        changes = [f"{k} {saved_identity['config'].get(k)!r} -> {v!r}" for k, v in identity["config"].items()
                   if saved_identity["config"].get(k) != v]
        changes += [f"the {part} changed" for part in ("data", "model") if saved_identity[part] != identity[part]]
        raise ConfigError(f"--resume: {checkpoint} belongs to another run ({'; '.join(changes)}); resume with the "
                          "same options, data and model, or start a new --output")
    if not state.get("resumable", True):
        raise ConfigError(f"--resume: {checkpoint} was written under DeepSpeed by an older dpokit, without its "
                          "optimizer state; train on from its weights with --model")
    check_partitions(checkpoint, state, engine, processes)


def load_trainer_state(checkpoint: Path, scorer: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       scheduler: LRScheduler, *, sharded: bool = False) -> int:
    """Restore optimizer, scheduler and RNG state from `checkpoint` into the prepared policy; return its step."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state = json.loads((checkpoint / "trainer_state.json").read_text())
    tensors = load_file(str(checkpoint / "trainer_state.safetensors"))
    if state.get("engine"):  # DeepSpeed: each process reads its own partitions
        load_partitions(scorer, checkpoint)
    else:
        set_optimizer_state_dict(scorer, optimizer, _unflatten_optimizer(tensors, state["optimizer"]),
                                 options=StateDictOptions(full_state_dict=sharded))
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    return int(state["step"])
