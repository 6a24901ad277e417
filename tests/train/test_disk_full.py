"""A full disk while a checkpoint is written: a one-line error naming the directory and the bytes it needs, nothing of
the new checkpoint left (its temporary directory removed), the previous checkpoint and metrics.jsonl intact, and
--resume after space is freed ends where the uninterrupted run does. On a real small filesystem (a tmpfs, where this
process may mount one) and by fault injection at each file of the checkpoint (weights, tokenizer, trainer state,
manifest)."""

from __future__ import annotations

import errno
import re
import subprocess
from pathlib import Path

import pytest
from transformers import PreTrainedModel, PreTrainedTokenizerBase

import dpokit.train.checkpoint as checkpoint
from dpokit.api import train_dpo
from dpokit.cli.main import main
from dpokit.config import TrainConfig
from dpokit.errors import TrainingError
from dpokit.train.checkpoint import latest_checkpoint, verify_checkpoint
from dpokit.train.metrics import read_metrics
from dpokit.train.rundir import tree_bytes

pytestmark = pytest.mark.usefixtures("single_thread")


def _args(model, data, out, *extra):
    return ["dpo", "--model", model, "--data", data, "--output", str(out), "--batch-size", "4", "--lr", "1e-3",
            "--warmup-steps", "0", "--max-steps", "3", "--save-every", "1", *extra]


def _needed(message: str) -> int:
    return int(re.search(r"about ([\d,]+) bytes needed", message).group(1).replace(",", ""))


def test_a_full_tmpfs_stops_with_the_bytes_needed_and_resume_after_freeing_space_ends_the_same(
        tiny_model_dir, sentiment_data, tmp_path, capsys):
    whole = tmp_path / "whole"
    assert main(_args(tiny_model_dir, sentiment_data["train"], whole)) == 0
    size = tree_bytes(whole / "checkpoint-000001")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size * 1.6) // 1024 + 64}k", "tmpfs",
                              str(disk)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or mounted.returncode}")
    try:
        out = disk / "run"
        capsys.readouterr()
        assert main(_args(tiny_model_dir, sentiment_data["train"], out)) == 2
        error = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert len(error) == 1 and "Traceback" not in error[0], error
        assert f"{out / 'checkpoint-000002'}: no space left on the device" in error[0]
        assert _needed(error[0]) == pytest.approx(size, rel=0.01) and "(the size of checkpoint-000001)" in error[0]
        assert "bytes free there" in error[0] and "--resume" in error[0]
        assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-000001"]
        assert latest_checkpoint(out) == out / "checkpoint-000001"
        assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"][:1] == [1]

        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)  # space freed
        assert main(_args(tiny_model_dir, sentiment_data["train"], out, "--resume")) == 0
        assert (out / "final" / "model.safetensors").read_bytes() == \
            (whole / "final" / "model.safetensors").read_bytes()
        assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"] == [1, 2, 3]
        assert not list(out.glob("*.tmp"))
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def _full_disk(monkeypatch, target: str, directory: str) -> None:
    """Make the write of `target` in `directory` (a checkpoint's temporary name) leave a partial file, then fail
    as a full device does."""
    def fail(path) -> None:
        if Path(path).name == directory + ".tmp" or Path(path).parent.name == directory + ".tmp":
            folder = Path(path) if Path(path).is_dir() else Path(path).parent
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "partial").write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")

    if target == "weights":
        save = PreTrainedModel.save_pretrained
        monkeypatch.setattr(PreTrainedModel, "save_pretrained",
                            lambda self, path, **kw: (fail(path), save(self, path, **kw))[1])
    elif target == "tokenizer":
        save = PreTrainedTokenizerBase.save_pretrained
        monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained",
                            lambda self, path, **kw: (fail(path), save(self, path, **kw))[1])
    elif target == "trainer state":
        save = checkpoint.save_file
        monkeypatch.setattr(checkpoint, "save_file",
                            lambda tensors, path, **kw: (fail(path), save(tensors, path, **kw))[1])
    else:
        write = checkpoint.write_manifest
        monkeypatch.setattr(checkpoint, "write_manifest", lambda path: (fail(path), write(path))[1])


@pytest.mark.parametrize("target,step", [("weights", 2), ("tokenizer", 2), ("trainer state", 2), ("manifest", 2),
                                         ("weights", 1)])
def test_a_full_disk_at_any_file_of_a_checkpoint(target, step, tiny_model_dir, sentiment_data, tmp_path,
                                                 monkeypatch):
    out = tmp_path / "run"
    directory = f"checkpoint-{step:06d}"
    _full_disk(monkeypatch, target, directory)
    config = TrainConfig(model=tiny_model_dir, data=sentiment_data["train"], output=str(out), batch_size=4,
                         max_steps=2, save_every=1, warmup_steps=0, save_final=False)
    with pytest.raises(TrainingError) as raised:
        train_dpo(config)
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"{out / directory}: no space left on the device: about ")
    assert not [p.name for p in out.iterdir() if p.name.startswith(directory)]  # its .tmp directory is gone
    if step == 2:
        assert verify_checkpoint(out / "checkpoint-000001") is None
        assert _needed(message) == tree_bytes(out / "checkpoint-000001")
        assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"] == [1, 2]
    else:  # no checkpoint before it: the weights and the optimizer state, about what a checkpoint holds
        assert "(the weights and the optimizer's state)" in message
        monkeypatch.undo()
        train_dpo(TrainConfig(**{**vars(config), "max_steps": 1, "resume": True}))
        assert 0.7 < _needed(message) / tree_bytes(out / "checkpoint-000001") < 1.3
