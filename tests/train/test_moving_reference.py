"""TR-DPO's moving reference: the soft update, when it happens, its checkpointing and exact resume, the errors."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file
from torch import nn

from dpokit.api import train_dpo
from dpokit.data.batching import collate
from dpokit.config import TrainConfig
from dpokit.errors import ConfigError
from dpokit.models.logprobs import sequence_logprobs
from dpokit.losses.dispatch import LossConfig
from dpokit.train.moving_reference import STATE_FILE, MovingReference, check_sync_engine, mix_weights_, paired_parameters
from dpokit.losses.objective import DPOObjective
from dpokit.train.reference import ModelReference
from dpokit.train.loop import prepare, train
from helpers import make_llama
from test_checkpoint import _examples

pytestmark = pytest.mark.usefixtures("single_thread")


class Pair(nn.Module):
    def __init__(self, weight, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(weight))
        self.bias = nn.Parameter(torch.tensor(bias))


def test_soft_update_by_hand():
    reference, policy = Pair([1.0, 2.0], [0.5]), Pair([3.0, -2.0], [4.5])
    mix_weights_(paired_parameters(reference, policy), 0.25)
    # 0.25·3 + 0.75·1 = 1.5; 0.25·(−2) + 0.75·2 = 1; 0.25·4.5 + 0.75·0.5 = 1.5
    assert reference.weight.tolist() == [1.5, 1.0] and reference.bias.tolist() == [1.5]
    assert policy.weight.tolist() == [3.0, -2.0]  # the policy is only read
    mix_weights_(paired_parameters(reference, policy), 1.0)  # α = 1: a hard copy, exact
    assert torch.equal(reference.weight, policy.weight) and torch.equal(reference.bias, policy.bias)


def test_soft_update_keeps_the_reference_dtype():
    reference, policy = Pair([1.0, 2.0], [0.5]).to(torch.bfloat16), Pair([3.0, -2.0], [4.5])
    mix_weights_(paired_parameters(reference, policy), 0.5)
    assert reference.weight.dtype == torch.bfloat16 and reference.weight.tolist() == [2.0, 0.0]


def test_soft_update_matches_trl_sync_callback(tokenizer):
    from trl.trainer.callbacks import SyncRefModelCallback

    policy, ours = make_llama(vocab_size=len(tokenizer), seed=1), make_llama(vocab_size=len(tokenizer), seed=2)
    theirs = copy.deepcopy(ours)
    mix_weights_(paired_parameters(ours, policy), 0.6)
    SyncRefModelCallback._sync_target_model(policy, theirs, 0.6)
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_update_only_after_multiples_of_n():
    reference, policy = Pair([1.0, 2.0], [0.5]), Pair([3.0, -2.0], [4.5])
    moving = MovingReference(reference, policy, every=3, alpha=0.5)
    assert [moving.after_step(s) for s in (1, 2)] == [False, False]
    assert reference.weight.tolist() == [1.0, 2.0]
    assert moving.after_step(3) and reference.weight.tolist() == [2.0, 0.0]


def test_a_reference_of_another_shape_is_refused():
    with pytest.raises(ConfigError, match="shape"):
        paired_parameters(Pair([1.0, 2.0], [0.5]), Pair([1.0, 2.0, 3.0], [0.5]))
    other = nn.Linear(2, 1)
    with pytest.raises(ConfigError, match="do not match"):
        paired_parameters(other, nn.Sequential(nn.Linear(2, 1)))


def test_training_moves_the_reference_every_n_steps_and_checkpoints_it(tmp_path, tokenizer):
    """sync every 2 steps, α 0.5, 3 steps: the reference scores the first 2 steps as at the start and step 3
    as the mix; checkpoint 2's reference is 0.5·(policy at step 2) + 0.5·(start), checkpoint 1's the start."""
    model = make_llama(vocab_size=len(tokenizer))
    start = {k: v.clone() for k, v in model.named_parameters()}
    cfg = TrainConfig(model="m", data="d", output=str(tmp_path / "run"), batch_size=2, max_steps=3, save_every=1,
                      lr=1e-2, warmup_steps=0, optimizer="adamw", sync_ref_every=2, ref_mixup_alpha=0.5)
    reference_model = copy.deepcopy(model)
    probe = collate(_examples(4, seed=9), list(range(4)))
    seen = []

    class Spy(ModelReference):  # also scores a fixed probe batch whenever the trainer asks for reference log-probs
        def __call__(self, batch, policy=None):
            seen.append(self.model(probe))
            return super().__call__(batch, policy)

    reference = Spy(reference_model)
    engine = prepare(model, 8, cfg, Accelerator())
    engine.moving_reference = MovingReference(reference_model, engine.model, 2, 0.5)
    train(engine, tokenizer, DPOObjective(LossConfig("sigmoid", 0.1), reference), _examples(8), None, cfg)
    assert len(seen) == 3  # one forward per step (batch 2, no accumulation, one forward group)
    assert torch.equal(seen[0], seen[1])  # steps 1 and 2: the starting reference
    assert not torch.allclose(seen[2], seen[0], atol=1e-4)  # step 3: it has moved
    out = cfg.output_dir
    first, second = load_file(str(out / "checkpoint-000001" / STATE_FILE)), load_file(str(out / "checkpoint-000002" / STATE_FILE))
    policy2 = load_file(str(out / "checkpoint-000002" / "model.safetensors"))
    for name, value in start.items():
        assert torch.equal(first[name], value), name
        assert torch.allclose(second[name], 0.5 * policy2[name] + 0.5 * value, atol=1e-6), name
    assert not torch.allclose(second["lm_head.weight"], start["lm_head.weight"], atol=1e-4)
    assert STATE_FILE in (out / "checkpoint-000002" / "manifest.json").read_text()


@pytest.mark.slow
def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tiny_model_dir, sentiment_data, tmp_path):
    """4 steps syncing every 2 (α 0.5), against 3 steps (checkpointed after the first sync) resumed to 4: step 4
    must score against the moved reference restored from checkpoint 3, so the final weights are equal bit for
    bit only if the reference was saved and loaded."""
    options = dict(model=tiny_model_dir, data=sentiment_data["train"], batch_size=4, lr=1e-3, warmup_steps=0,
                   sync_ref_every=2, ref_mixup_alpha=0.5, save_every=1, seed=1)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train_dpo(TrainConfig(**options, output=str(whole), max_steps=4))
    train_dpo(TrainConfig(**options, output=str(cut), max_steps=3, save_final=False))
    moved = load_file(str(cut / "checkpoint-000003" / STATE_FILE))
    start = load_file(str(tiny_model_dir + "/model.safetensors"))
    assert not torch.equal(moved["lm_head.weight"], start["lm_head.weight"])  # the resume has something to restore
    train_dpo(TrainConfig(**options, output=str(cut), max_steps=4, resume=True))
    for name in ("final/model.safetensors", f"checkpoint-000004/{STATE_FILE}"):
        a, b = load_file(str(whole / name)), load_file(str(cut / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)


@pytest.mark.parametrize("options, message", [
    (dict(precompute_ref=True), "--precompute-ref"),
    (dict(loss="simpo"), "reference-free"),
    (dict(reference_free=True), "reference-free"),
    (dict(lora_r=4), "LoRA"),
    (dict(ref_offload=True), "--ref-offload"),
    (dict(sync_ref_every=-1), "must not be negative"),
    (dict(ref_mixup_alpha=0.0), r"\(0, 1\]"),
    (dict(ref_mixup_alpha=1.5), r"\(0, 1\]"),
])
def test_options_without_a_movable_reference_are_one_line_errors(options, message):
    values = {"model": "m", "data": "d", "output": "o", "sync_ref_every": 4, **options}
    with pytest.raises(ConfigError, match=message) as error:
        TrainConfig(**values)
    assert "\n" not in str(error.value)


def test_off_by_default_and_with_zero():
    assert TrainConfig(model="m", data="d", output="o", precompute_ref=True).sync_ref_every is None
    TrainConfig(model="m", data="d", output="o", precompute_ref=True, sync_ref_every=0)  # 0 = off: no error


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_is_refused(stage):
    state = types.SimpleNamespace(deepspeed_plugin=types.SimpleNamespace(zero_stage=stage))
    accelerator = types.SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=2, state=state)
    with pytest.raises(ConfigError, match=f"under zero{stage} .* DDP or FSDP2"):
        check_sync_engine(accelerator)
    for kind in (DistributedType.MULTI_CPU, DistributedType.FSDP):  # (tests/train/test_engine.py runs both)
        check_sync_engine(types.SimpleNamespace(distributed_type=kind, num_processes=2))
