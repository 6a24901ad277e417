"""DeepSpeed's partitioned training state inside a dpokit checkpoint: ``checkpoint-STEP/deepspeed/``.

Under ZeRO-2 and ZeRO-3 the optimizer state (and the fp32 master weights) exist only as one partition per
process. Every process writes its own with DeepSpeed's ``save_checkpoint`` into a staging directory beside the
checkpoint (``checkpoint-STEP.engine.tmp``); the main process moves it into the checkpoint's temporary directory
before the manifest is written and the directory renamed into place, so a kill at any moment leaves either the
whole checkpoint or none of it. ``--resume`` reads the partitions back with DeepSpeed's ``load_checkpoint``, on
the same ZeRO stage and number of processes. These files are DeepSpeed's own (torch pickles), read only after
the manifest has checked them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from dpokit.errors import ConfigError, TrainingError

ENGINE_STATE = "deepspeed"  # the directory of a checkpoint that holds them (DeepSpeed's tag directory)


def save_partitions(scorer, final: Path, accelerator) -> Path:
    """Every process writes its partitions into FINAL.engine.tmp/deepspeed/ (a staging directory left by an
    interrupted save is removed first); returns the staging directory."""
    staging = final.with_name(final.name + ".engine.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    scorer.save_checkpoint(str(staging), tag=ENGINE_STATE, save_latest=False)
    accelerator.wait_for_everyone()
    return staging


def move_partitions(staging: Path, tmp: Path) -> None:
    """Move the staged partitions into the checkpoint being written (main process, before its manifest)."""
    os.replace(staging / ENGINE_STATE, tmp / ENGINE_STATE)


def check_partitions(checkpoint: Path, state: dict, engine: str, processes: int | None) -> None:
    """Refuse to resume across DeepSpeed and another engine, ZeRO stage or number of processes."""
    saved = state.get("engine")  # recorded by DeepSpeed checkpoints only
    if (saved or engine.startswith("zero")) and (saved, state.get("processes")) != (engine, processes):
        was = f"{saved} on {state.get('processes')} processes" if saved else "another engine"
        raise ConfigError(f"--resume: {checkpoint} was written under {was}, this run is {engine} on {processes}: "
                          "DeepSpeed resumes only from its own partitions, with the same ZeRO stage and processes; "
                          "launch it that way, or train on from its weights with --model")


def load_partitions(scorer, checkpoint: Path) -> None:
    """Every process reads its partitions (fp32 master weights, optimizer state) into the DeepSpeed engine.

    Not DeepSpeed's copy of the module: ZeRO-2's weights are the checkpoint's model files, loaded before the
    engine took the model, and ZeRO-3 sets its partitioned weights from the fp32 masters.
    """
    loaded, _ = scorer.load_checkpoint(str(checkpoint), tag=ENGINE_STATE, load_optimizer_states=True,
                                       load_lr_scheduler_states=False, custom_load_fn=lambda src, dst: None)
    if loaded is None:
        raise TrainingError(f"--resume: DeepSpeed could not load {checkpoint / ENGINE_STATE}")
