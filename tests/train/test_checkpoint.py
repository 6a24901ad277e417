"""Checkpoints: Hugging Face-loadable, safetensors/JSON only, atomic, and an exact round trip of the trainer state."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpokit.data.batching import collate
from dpokit.train.checkpoint import (latest_checkpoint, load_model_weights, load_trainer_state, save_checkpoint,
                               write_manifest)
from dpokit.cli.main import main
from dpokit.config import TrainConfig
from dpokit.models.logprobs import sequence_logprobs
from dpokit.losses.dispatch import LossConfig
from dpokit.losses.objective import DPOObjective
from dpokit.train.reference import ModelReference
from dpokit.data.tokenize import TokenizedExample
from dpokit.train.engine import unwrap_optimizer
from dpokit.train.loop import prepare, train
from helpers import make_llama

pytestmark = pytest.mark.usefixtures("single_thread")

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def _examples(n: int, seed: int = 0) -> list[TokenizedExample]:
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return tuple(torch.randint(3, 320, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist())

    return [TokenizedExample(ids(1, 6), (ids(1, 5) + (0,), ids(1, 5) + (0,))) for _ in range(n)]


@pytest.fixture
def trained(tmp_path, tokenizer):
    """A Llama trained in memory for 3 DPO steps, checkpointing every step."""
    model = make_llama(vocab_size=len(tokenizer))
    cfg = TrainConfig(model="m", data="d", output=str(tmp_path / "run"), batch_size=2, max_steps=3, save_every=1,
                      lr=1e-3, warmup_steps=2, schedule="cosine", optimizer="adamw")
    objective = DPOObjective(LossConfig("sigmoid", 0.1), ModelReference(copy.deepcopy(model)))
    train(prepare(model, 8, cfg, Accelerator()), tokenizer, objective, _examples(8), None, cfg)
    return model, cfg


def test_checkpoint_is_a_hugging_face_model_directory(trained, tokenizer):
    model, cfg = trained
    checkpoint = cfg.output_dir / "checkpoint-000003"
    loaded = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    assert AutoTokenizer.from_pretrained(checkpoint).get_vocab() == tokenizer.get_vocab()
    batch = collate(_examples(4, seed=9), list(range(4)))
    model.eval()
    with torch.no_grad():
        expected, got = sequence_logprobs(model, batch), sequence_logprobs(loaded, batch)
    assert torch.allclose(expected, got, atol=1e-5)
    # and it is the trained model, not the initial one
    with torch.no_grad():
        initial = sequence_logprobs(make_llama(vocab_size=len(tokenizer)), batch)
    assert not torch.allclose(initial, got, atol=1e-3)


def test_checkpoint_contents_are_safetensors_and_json(trained):
    _, cfg = trained
    checkpoint = cfg.output_dir / "checkpoint-000002"
    names = {p.name for p in checkpoint.iterdir()}
    assert {"model.safetensors", "config.json", "trainer_state.safetensors", "trainer_state.json",
            "tokenizer.json"} <= names
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["step"] == 2
    assert state["config"]["optimizer"] == "adamw" and state["config"]["schedule"] == "cosine"
    assert sorted(p.name for p in cfg.output_dir.iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint-000001", "checkpoint-000002", "checkpoint-000003"]  # no .tmp left behind


def test_no_pickle_files_anywhere_in_a_dpo_output(tiny_model_dir, sentiment_data, tmp_path):
    """A whole DPO run (precomputed reference cache, eval, checkpoints, final model) writes no pickles."""
    out = tmp_path / "run"
    assert main(["dpo", "--model", tiny_model_dir, "--data", sentiment_data["train"], "--eval-fraction", "0.1",
                 "--output", str(out), "--batch-size", "4", "--max-steps", "2", "--save-every", "1",
                 "--precompute-ref", "--warmup-steps", "0"]) == 0
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "trainer_state.safetensors" for p in files)
    assert any(p.parent.name == "ref_cache" and p.suffix == ".safetensors" for p in files)
    assert (out / "final" / "model.safetensors").exists()
    pickles = [p for p in files if p.suffix in PICKLE_SUFFIXES or "pickle" in p.name]
    assert pickles == []
    for path in files:  # and nothing that is a pickle under another name (protocol 2+ starts with 0x80)
        if path.suffix not in (".json", ".jsonl", ".txt") and "tfevents" not in path.name:
            assert path.read_bytes()[:1] != b"\x80", path


def test_latest_checkpoint_ignores_partial_damaged_and_temporary_directories(tmp_path, capsys):
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "missing") is None

    def make(name, complete=True):
        path = tmp_path / name
        path.mkdir()
        (path / "trainer_state.json").write_text("{}")
        (path / "model.safetensors").write_bytes(b"weights" * 10)
        if complete:
            write_manifest(path)
        return path

    make("checkpoint-000002")
    make("checkpoint-000010")
    make("checkpoint-000009")
    make("checkpoint-000003.tmp")  # a save interrupted before its rename: complete-looking but temporary
    make("checkpoint-000011.tmp", complete=False)
    make("checkpoint-000012", complete=False)  # no manifest: never finished
    make("checkpoint-final")
    (tmp_path / "checkpoint-000013").write_text("a file, not a directory")
    truncated = make("checkpoint-000014")
    (truncated / "model.safetensors").write_bytes(b"weights")  # cut short by a full disk or a dying node
    flipped = make("checkpoint-000015")
    (flipped / "model.safetensors").write_bytes(b"WEIGHTS" * 10)  # same size, other bytes
    missing = make("checkpoint-000016")
    (missing / "trainer_state.json").unlink()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-000010"
    out = capsys.readouterr().out
    assert "checkpoint-000016: trainer_state.json is missing" in out
    assert "checkpoint-000015: model.safetensors does not match its checksum" in out
    assert "checkpoint-000014: model.safetensors has 7 bytes, its manifest says 70" in out
    assert "checkpoint-000012: no readable manifest" in out
    make("checkpoint-1000000")  # more digits than the padding still sorts by number
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-1000000"


def test_save_replaces_a_leftover_temporary_directory(tmp_path, tokenizer):
    engine = prepare(make_llama(vocab_size=len(tokenizer)), 8, TrainConfig(model="m", data="d", output="o"),
                     Accelerator())
    stale = tmp_path / "checkpoint-000003.tmp"
    stale.mkdir(parents=True)
    (stale / "junk.bin").write_bytes(b"junk")
    path = save_checkpoint(tmp_path, 3, engine, tokenizer, {})
    assert path == tmp_path / "checkpoint-000003" and not stale.exists()
    assert not (path / "junk.bin").exists()
    assert latest_checkpoint(tmp_path) == path


@pytest.mark.parametrize("name", ["adamw", "rmsprop"])
def test_optimizer_scheduler_and_rng_state_round_trip_exactly(name, tmp_path, tokenizer):
    cfg = TrainConfig(model="m", data="d", output=str(tmp_path), optimizer=name, lr=1e-3, weight_decay=0.01,
                      warmup_steps=3, schedule="cosine")

    def build(seed):  # 80 examples in global batches of 8: a 10-step schedule
        engine = prepare(make_llama(vocab_size=len(tokenizer), seed=seed), 80, cfg, Accelerator())
        return engine, engine.model, unwrap_optimizer(engine.optimizer), engine.scheduler

    engine, model, optimizer, scheduler = build(0)
    batch = collate(_examples(4), list(range(4)))
    for _ in range(2):
        sequence_logprobs(model, batch).sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    torch.manual_seed(123)
    path = save_checkpoint(tmp_path, 2, engine, tokenizer, {"metrics": {}})
    expected_random = torch.rand(5)

    fresh_engine, fresh_model, fresh_optimizer, fresh_scheduler = build(1)
    torch.manual_seed(999)
    load_model_weights(fresh_model, path)
    assert load_trainer_state(path, fresh_engine.scorer, fresh_optimizer, fresh_scheduler) == 2
    assert torch.equal(torch.rand(5), expected_random)  # the RNG continues where the run left it

    for (k, a), b in zip(model.state_dict().items(), fresh_model.state_dict().values()):
        assert torch.equal(a, b), k
    saved, loaded = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    assert saved["state"].keys() == loaded["state"].keys() and len(saved["state"]) > 0
    for index, values in saved["state"].items():
        assert values.keys() == loaded["state"][index].keys()
        for key, value in values.items():
            other = loaded["state"][index][key]
            if isinstance(value, torch.Tensor):
                assert value.dtype == other.dtype and torch.equal(value, other), (index, key)
            else:
                assert value == other, (index, key)
    assert scheduler.state_dict() == fresh_scheduler.state_dict()
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr()

    # and the next step is identical
    for m, opt, sch in ((model, optimizer, scheduler), (fresh_model, fresh_optimizer, fresh_scheduler)):
        sequence_logprobs(m, batch).sum().backward()
        opt.step()
        sch.step()
    for (k, a), b in zip(model.state_dict().items(), fresh_model.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_whole_run_and_its_resume_unpickle_nothing(tiny_model_dir, sentiment_data, tmp_path, monkeypatch):
    """Loading is safetensors and JSON only: pickle's and torch's loaders fail the test if anything calls them
    (training with a LoRA adapter and precomputed reference, checkpoints, a resume, the final save and eval)."""
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    for owner, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(owner, name, refuse)
    args = ["dpo", "--model", tiny_model_dir, "--data", sentiment_data["train"], "--eval-fraction", "0.1",
            "--batch-size", "4", "--save-every", "1", "--precompute-ref", "--warmup-steps", "0", "--lora-r", "4"]
    out = tmp_path / "run"
    assert main(args + ["--max-steps", "2", "--output", str(out)]) == 0
    assert main(args + ["--max-steps", "3", "--output", str(out), "--resume"]) == 0
    assert main(["eval", "--model", str(out / "final"), "--ref-model", tiny_model_dir,
                 "--data", sentiment_data["eval"], "--json"]) == 0
