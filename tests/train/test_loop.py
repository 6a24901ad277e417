"""The training loop: accumulation and data-parallel invariance, exact resume, data order, schedule, eval, dropout."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from dpokit.api import train_dpo, train_sft
from dpokit.data.batching import collate
from dpokit.cli.main import main
from dpokit.config import TrainConfig
from dpokit.errors import ConfigError
from dpokit.models.logprobs import sequence_logprobs
from dpokit.losses.dispatch import LossConfig
from dpokit.train.metrics import read_metrics
from dpokit.losses.objective import DPOObjective, SFTObjective
from dpokit.train.reference import ModelReference
from dpokit.data.tokenize import TokenizedExample
from dpokit.train.engine import Scorer
from dpokit.train.loop import evaluate, prepare, train
from dpokit.train.schedule import Plan, lr_factor, make_plan, step_indices
from helpers import make_gpt2, make_llama

pytestmark = pytest.mark.usefixtures("single_thread")

STAGES = {"dpo": train_dpo, "sft": train_sft}


def _weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / "model.safetensors"))


def assert_same_weights(a, b, atol=1e-5):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst <= atol, f"weights differ by {worst}"


def assert_weights_moved(a, b):
    wa, wb = _weights(a), _weights(b)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) > 1e-4


def train_rows(output) -> list[dict]:
    return [r for r in read_metrics(Path(output) / "metrics.jsonl") if r["split"] == "train"]


def assert_same_rows(a: list[dict], b: list[dict], keys, atol=1e-5):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in keys:
            assert ra[key] == pytest.approx(rb[key], abs=atol, rel=1e-5), (ra["step"], key, ra[key], rb[key])


def config(model, data, output, **overrides) -> TrainConfig:
    values = dict(model=model, data=data, output=str(output), lr=1e-3, warmup_steps=0, max_steps=3, seed=0)
    values.update(overrides)
    return TrainConfig(**values)


# --- gradient accumulation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stage,optimizer", [("dpo", "rmsprop"), ("sft", "adamw")])
def test_accumulation_gives_the_same_updates_as_one_big_batch(stage, optimizer, tiny_model_dir, sentiment_data,
                                                              tmp_path):
    """8 x 1 and 2 x 4: the same parameters after 1 and 3 optimizer steps, the same logged loss and grad norm.

    SFT's loss is a mean over tokens and the 2-example micro-batches hold different token counts, so a
    per-micro-batch mean (what many trainers do) would weight tokens differently and fail here. Adaptive
    optimizers hide a global scale error in the weights; the logged loss and grad_norm reveal it.
    """
    runs = {}
    for name, batch, accum in (("big", 8, 1), ("accumulated", 2, 4)):
        out = tmp_path / name
        STAGES[stage](config(tiny_model_dir, sentiment_data["train"], out, batch_size=batch, grad_accum=accum,
                             optimizer=optimizer, save_every=1, save_final=False))
        runs[name] = out
    big, acc = runs["big"], runs["accumulated"]
    for step in (1, 3):
        assert_same_weights(big / f"checkpoint-{step:06d}", acc / f"checkpoint-{step:06d}")
    assert_weights_moved(big / "checkpoint-000001", tiny_model_dir)
    keys = ["loss", "grad_norm", "lr"] + (["rewards/margins", "rewards/accuracies"] if stage == "dpo" else [])
    assert_same_rows(train_rows(big), train_rows(acc), keys)


@pytest.mark.parametrize("stage", ["dpo", "sft"])
def test_forward_groups_change_no_number(stage, tiny_model_dir, sentiment_data, tmp_path):
    """One example per forward pass (forward_tokens=1) gives the whole micro-batch's update (forward_tokens=0)."""
    runs = {}
    for budget in (0, 1):
        out = tmp_path / f"budget{budget}"
        STAGES[stage](config(tiny_model_dir, sentiment_data["train"], out, batch_size=8, forward_tokens=budget,
                             optimizer="adamw", save_every=1, save_final=False, max_steps=2))
        runs[budget] = out
    assert_same_weights(runs[0] / "checkpoint-000002", runs[1] / "checkpoint-000002")
    assert_weights_moved(runs[0] / "checkpoint-000001", tiny_model_dir)
    assert_same_rows(train_rows(runs[0]), train_rows(runs[1]), ["loss", "grad_norm"])


def test_sft_micro_batches_really_differ_in_token_counts(tiny_model_dir, sentiment_data, tokenizer):
    """Guard for the test above: its micro-batches of step 1 do not all hold the same number of tokens."""
    from dpokit.api import prepare_data

    cfg = config(tiny_model_dir, sentiment_data["train"], "unused", batch_size=2, grad_accum=4)
    data = prepare_data(cfg, "sft", tokenizer, log=lambda *_: None)
    plan = make_plan(len(data.train), cfg, 1)
    indices = step_indices(0, plan, len(data.train), cfg.seed)
    counts = {SFTObjective().divisor(collate([data.train[i] for i in indices[k:k + 2]], indices[k:k + 2]))
              for k in range(0, 8, 2)}
    assert len(counts) > 1


# --- data parallelism --------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the 2-process check runs on CPU (gloo)")
@pytest.mark.parametrize("stage", ["dpo", "sft"])
def test_two_processes_equal_one_process(stage, tiny_model_dir, sentiment_data, tmp_path):
    """`accelerate launch` with 2 CPU processes x batch 4 == 1 process x batch 8: weights, train and eval metrics.

    The held-out set has an odd size, so the processes evaluate different numbers of examples; in SFT the
    processes' halves of a batch hold different token counts.
    """
    eval_path = tmp_path / "eval.jsonl"
    eval_path.write_text("".join(Path(sentiment_data["eval"]).read_text().splitlines(keepends=True)[:15]))
    args = [stage, "--model", tiny_model_dir, "--data", sentiment_data["train"], "--eval-data", str(eval_path),
            "--max-steps", "3", "--lr", "1e-3", "--warmup-steps", "1", "--eval-every", "2", "--seed", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("ACCELERATE_USE_CPU", None)  # the CPU-only multi-process setup must not depend on it
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port()), "-m", "dpokit.cli.main"]
    two = tmp_path / "two"
    result = subprocess.run(launch + args + ["--batch-size", "4", "--output", str(two)], env=env,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 x 1 accumulation x 2 processes" in result.stdout + result.stderr

    one = tmp_path / "one"
    assert main(args + ["--batch-size", "8", "--output", str(one)]) == 0
    pair_keys = ("rewards/margins", "rewards/accuracies", "logps/chosen") if stage == "dpo" else ()
    assert_same_weights(one / "final", two / "final")
    assert_weights_moved(one / "final", tiny_model_dir)
    rows_one, rows_two = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
    assert [(r["split"], r["step"]) for r in rows_one] == [(r["split"], r["step"]) for r in rows_two]
    for a, b in zip(rows_one, rows_two):
        for key in ("loss",) + pair_keys + (
                ("grad_norm", "lr") if a["split"] == "train" else ()):
            assert a[key] == pytest.approx(b[key], abs=1e-5, rel=1e-5), (a["split"], a["step"], key)


# --- resume ------------------------------------------------------------------------------------------------


def test_resume_equals_an_uninterrupted_run(tiny_model_dir, sentiment_data, tmp_path):
    """Interrupted after checkpoint 3 of 6 and resumed: the same losses, learning rates and final weights.

    Warm-up + cosine make the scheduler state matter, RMSprop's running averages the optimizer state.
    """
    args = ["dpo", "--model", tiny_model_dir, "--data", sentiment_data["train"], "--batch-size", "4",
            "--max-steps", "6", "--save-every", "3", "--lr", "1e-3", "--warmup-steps", "2", "--schedule", "cosine",
            "--optimizer", "rmsprop"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(args + ["--output", str(full)]) == 0
    shutil.copytree(full, cut)  # the state a crash right after checkpoint 3 would have left
    shutil.rmtree(cut / "checkpoint-000006")
    shutil.rmtree(cut / "final")
    rows = read_metrics(cut / "metrics.jsonl")
    (cut / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= 3))

    assert main(args + ["--output", str(cut), "--resume"]) == 0
    a, b = train_rows(full), train_rows(cut)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert_same_rows(a[3:], b[3:], ["loss", "grad_norm", "lr", "rewards/margins"])
    assert len({r["lr"] for r in a}) >= 4  # the schedule really varies over the run
    assert_same_weights(full / "final", cut / "final")
    assert_same_weights(full / "checkpoint-000006", cut / "checkpoint-000006")


def test_resume_with_another_data_order_is_an_error(tiny_model_dir, sentiment_data, tmp_path, capsys):
    """The data position is the step: resuming with another global batch would silently change the order."""
    args = ["dpo", "--model", tiny_model_dir, "--data", sentiment_data["train"], "--max-steps", "2",
            "--output", str(tmp_path / "run")]
    assert main(args + ["--batch-size", "4"]) == 0
    assert main(args + ["--batch-size", "2", "--resume"]) == 2
    assert "another data order (global_batch 4 -> 2)" in capsys.readouterr().err


def test_resume_without_a_checkpoint_starts_from_scratch(tiny_model_dir, sentiment_data, tmp_path):
    out = tmp_path / "fresh"
    train_sft(config(tiny_model_dir, sentiment_data["train"], out, max_steps=1, batch_size=4, resume=True))
    assert [r["step"] for r in train_rows(out)] == [1]


# --- data order, plan, schedule ----------------------------------------------------------------------------


def test_step_indices_are_seeded_permutations_per_epoch():
    plan = Plan(global_batch=4, steps_per_epoch=5, total_steps=15)
    n = 22  # 2 examples left out of each epoch
    epochs = [[i for s in range(e * 5, e * 5 + 5) for i in step_indices(s, plan, n, seed=7)] for e in range(3)]
    for order in epochs:
        assert len(order) == 20 and len(set(order)) == 20 and set(order) <= set(range(n))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    assert step_indices(3, plan, n, seed=7) == step_indices(3, plan, n, seed=7)
    assert step_indices(3, plan, n, seed=7) != step_indices(3, plan, n, seed=8)
    assert epochs[0] != sorted(epochs[0])  # shuffled, not read in order


def test_make_plan_counts_and_too_little_data():
    cfg = TrainConfig(model="m", data="d", output="o", batch_size=2, grad_accum=3, epochs=2.5)
    plan = make_plan(40, cfg, num_processes=2)
    assert (plan.global_batch, plan.steps_per_epoch, plan.total_steps) == (12, 3, 7)
    assert make_plan(40, TrainConfig(model="m", data="d", output="o", batch_size=2, max_steps=9), 1).total_steps == 9
    with pytest.raises(ConfigError, match="fewer than one global batch of 12"):
        make_plan(11, cfg, num_processes=2)


def test_lr_factor_warmup_then_cosine_or_constant():
    cosine = TrainConfig(model="m", data="d", output="o", warmup_steps=4, schedule="cosine")
    assert [lr_factor(s, cosine, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, cosine, 14) == pytest.approx(1.0)
    assert lr_factor(9, cosine, 14) == pytest.approx(0.5)
    assert lr_factor(14, cosine, 14) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(11, cosine, 14) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.7)))
    constant = TrainConfig(model="m", data="d", output="o", warmup_steps=2)
    assert [lr_factor(s, constant, 10) for s in range(5)] == [0.5, 1.0, 1.0, 1.0, 1.0]
    none = TrainConfig(model="m", data="d", output="o", warmup_steps=0, schedule="cosine")
    assert lr_factor(0, none, 4) == 1.0 and lr_factor(2, none, 4) == pytest.approx(0.5)


def test_warmup_ratio_is_a_fraction_of_the_run_rounded_up():
    from dpokit.train.schedule import warmup_steps

    ratio = TrainConfig(model="m", data="d", output="o", warmup_ratio=0.25, schedule="cosine")
    assert warmup_steps(ratio, 14) == 4 and warmup_steps(ratio, 10) == 3 and warmup_steps(ratio, 1) == 1
    assert [lr_factor(s, ratio, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(9, ratio, 14) == pytest.approx(0.5)  # the same schedule as --warmup-steps 4
    assert lr_factor(5, TrainConfig(model="m", data="d", output="o", warmup_ratio=0.0), 10) == 1.0
    assert warmup_steps(TrainConfig(model="m", data="d", output="o"), 10) == 150  # the default is unchanged


def test_an_epoch_count_that_leaves_no_step_is_an_error():
    cfg = TrainConfig(model="m", data="d", output="o", batch_size=4, epochs=0.2)
    with pytest.raises(ConfigError, match=r"--epochs 0.2 of 2 steps per epoch .* give at least --epochs 0.5"):
        make_plan(8, cfg, num_processes=1)
    assert make_plan(8, TrainConfig(model="m", data="d", output="o", batch_size=4, epochs=0.5), 1).total_steps == 1


@pytest.mark.parametrize("options,eval_examples,expected", [
    ({}, 10, ["warm-up (150 steps) is not shorter than the run (5 steps): the learning rate rises to only 3.33% "
              "of --lr 1e-06 at the last step; lower --warmup-steps or give --warmup-ratio"]),
    ({"warmup_steps": 5, "schedule": "cosine"}, 10, ["warm-up (5 steps) is not shorter than the run (5 steps): the "
                                                     "learning rate rises to only 100% of --lr 1e-06 at the last "
                                                     "step and the cosine decay never starts"]),
    ({"warmup_steps": 4}, 10, []),
    ({"warmup_ratio": 0.5}, 10, []),
    ({"warmup_steps": 0, "eval_every": 6, "save_every": 9, "log_every": 7}, 10,
     ["--eval-every 6 is past the end of the run (5 steps): evaluation happens once, after the last step",
      "--save-every 9 is past the end of the run (5 steps): only the final checkpoint",
      "--log-every 7 is past the end of the run (5 steps): only the last step is logged"]),
    ({"warmup_steps": 0, "eval_every": 2}, 0, ["--eval-every 2 but there is no evaluation data"]),
    ({"warmup_steps": 0, "eval_every": 5, "save_every": 5, "log_every": 5}, 10, []),
])
def test_schedule_warnings(options, eval_examples, expected):
    from dpokit.train.schedule import schedule_warnings

    cfg = TrainConfig(model="m", data="d", output="o", batch_size=2, max_steps=5, **options)
    lines = schedule_warnings(make_plan(20, cfg, 1), cfg, eval_examples)
    assert len(lines) == len(expected)
    for line, text in zip(lines, expected):
        assert line.startswith("warning: ") and text in line, (line, text)


def test_logged_lr_is_the_rate_the_step_used(tiny_model_dir, sentiment_data, tmp_path):
    """The rate each optimizer.step() really ran with (read from its param_groups as it starts, not from the
    scheduler) is the warm-up rate of that step, and it is the logged one. A scheduler stepped before the
    optimizer would make step k use step k+1's rate while still logging step k's."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    used = []
    hook = register_optimizer_step_pre_hook(lambda optimizer, args, kwargs: used.append(
        [group["lr"] for group in optimizer.param_groups]))
    out = tmp_path / "lr"
    try:
        train_sft(config(tiny_model_dir, sentiment_data["train"], out, batch_size=4, max_steps=4, warmup_steps=3,
                         lr=1e-3, save_final=False))
    finally:
        hook.remove()
    assert len(used) == 4 and all(len(set(rates)) == 1 for rates in used)
    assert [rates[0] for rates in used] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3], rel=1e-12)
    assert [r["lr"] for r in train_rows(out)] == pytest.approx([rates[0] for rates in used], rel=1e-12)


# --- evaluation and dropout, on in-memory models -----------------------------------------------------------


def _examples(n: int, seed: int = 0, vocab: int = 320) -> list[TokenizedExample]:
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return tuple(torch.randint(1, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist())

    return [TokenizedExample(ids(1, 6), (ids(1, 5) + (0,), ids(1, 5) + (0,))) for _ in range(n)]


def test_evaluate_does_not_depend_on_the_eval_batch_size(tokenizer):
    policy, reference = make_llama(seed=0), make_llama(seed=1)
    objective = DPOObjective(LossConfig("sigmoid", 0.1), ModelReference(reference))
    examples = _examples(7)
    accelerator = Accelerator()
    results = []
    for batch_size in (1, 3, 16):
        cfg = TrainConfig(model="m", data="d", output="o", eval_batch_size=batch_size)
        results.append(evaluate(Scorer(policy), objective, examples, cfg, accelerator, pad_token_id=0))
    assert set(results[0]) == {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
                               "rewards/accuracies", "logps/chosen", "logps/rejected"}
    assert 0 < results[0]["rewards/accuracies"] < 1  # a real mix, so a wrong mean would show
    for other in results[1:]:
        for key, value in results[0].items():
            assert other[key] == pytest.approx(value, abs=1e-5), key
    # the eval mean is over pairs: it equals the mean of the 7 single-example results
    singles = [evaluate(Scorer(policy), objective, [e], TrainConfig(model="m", data="d", output="o"), accelerator, 0)
               for e in examples]
    assert results[0]["loss"] == pytest.approx(sum(s["loss"] for s in singles) / 7, abs=1e-6)


class _StubTokenizer:
    """The trainer only needs the pad id and save_pretrained."""

    pad_token_id = 0
    eos_token_id = 0

    def save_pretrained(self, path):
        Path(path, "tokenizer_stub.txt").write_text("stub")


def _train_in_memory(model, tmp_path, steps=2):
    cfg = TrainConfig(model="m", data="d", output=str(tmp_path), batch_size=2, max_steps=steps, lr=1e-3,
                      warmup_steps=0, save_every=0, save_final=False, log_every=100)
    objective = DPOObjective(LossConfig("sigmoid", 0.1), ModelReference(copy.deepcopy(model)))
    train(prepare(model, 8, cfg, Accelerator()), _StubTokenizer(), objective, _examples(8, seed=3), None, cfg)
    return model


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_dropout_in_the_config_is_switched_off_in_training(family, tmp_path):
    """A model whose config has dropout trains exactly like the same model without it, and its train-mode
    log-probs are deterministic (Llama keeps attention dropout as a float, not an nn.Dropout)."""
    if family == "llama":
        dropped, plain = make_llama(seed=0, attention_dropout=0.5), make_llama(seed=0)
    else:
        dropped, plain = make_gpt2(seed=0), make_gpt2(seed=0)
        dropped.config.resid_pdrop = dropped.config.embd_pdrop = dropped.config.attn_pdrop = 0.5
        dropped = type(dropped)(dropped.config)
        dropped.load_state_dict(plain.state_dict())
    torch.manual_seed(0)
    _train_in_memory(dropped, tmp_path / "a")
    torch.manual_seed(1)
    _train_in_memory(plain, tmp_path / "b")
    for (name, a), b in zip(dropped.state_dict().items(), plain.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert dropped.training
    batch = collate(_examples(3, seed=5), [0, 1, 2])
    with torch.no_grad():
        first, second = sequence_logprobs(dropped, batch), sequence_logprobs(dropped, batch)
        dropped.eval()
        evaluated = sequence_logprobs(dropped, batch)
    assert torch.equal(first, second)
    assert torch.allclose(first, evaluated, atol=1e-5)


# --- bfloat16 mixed precision ------------------------------------------------------------------------------


def test_bfloat16_mixed_precision_runs_with_finite_losses(tiny_model_dir, sentiment_data, tmp_path):
    """--dtype bfloat16 (accelerate autocast), in the same process as a float32 run: finite, and really bf16."""
    losses = {}
    for stage in ("sft", "dpo"):
        for dtype in ("float32", "bfloat16"):
            out = tmp_path / f"{stage}-{dtype}"
            assert main([stage, "--model", tiny_model_dir, "--data", sentiment_data["train"], "--output", str(out),
                         "--batch-size", "4", "--max-steps", "2", "--lr", "1e-3", "--warmup-steps", "0",
                         "--dtype", dtype, "--eval-fraction", "0.05", "--no-save-final"]) == 0
            rows = read_metrics(out / "metrics.jsonl")
            assert [r["split"] for r in rows] == ["train", "train", "eval"]
            losses[stage, dtype] = [r["loss"] for r in rows]
            assert all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))
    assert losses["sft", "bfloat16"] != pytest.approx(losses["sft", "float32"], abs=1e-6)  # autocast did act
    assert losses["sft", "bfloat16"] == pytest.approx(losses["sft", "float32"], rel=0.05)
    assert losses["dpo", "bfloat16"][1:] == pytest.approx(losses["dpo", "float32"][1:], abs=0.05)


def test_a_non_finite_gradient_stops_training_with_a_clear_error(tmp_path):
    """A NaN loss (fp16 overflow, a bad learning rate) stops the run before it corrupts the weights."""
    from dpokit.errors import TrainingError

    class NaNAfterFirstStep(DPOObjective):
        calls = 0

        def __call__(self, model, batch):
            result = super().__call__(model, batch)
            NaNAfterFirstStep.calls += 1
            if NaNAfterFirstStep.calls > 1:
                result.loss_sum = result.loss_sum * float("nan")
            return result

    model = make_llama()
    cfg = TrainConfig(model="m", data="d", output=str(tmp_path), batch_size=2, max_steps=3, lr=1e-3,
                      warmup_steps=0, save_every=1, save_final=False, forward_tokens=0)
    objective = NaNAfterFirstStep(LossConfig("sigmoid", 0.1), ModelReference(copy.deepcopy(model)))

    with pytest.raises(TrainingError, match=r"step 2: the gradient norm is nan .*nothing was updated"):
        train(prepare(model, 8, cfg, Accelerator()), _StubTokenizer(), objective, _examples(8, seed=3), None, cfg)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert (tmp_path / "checkpoint-000001").exists() and not (tmp_path / "checkpoint-000002").exists()


def test_adamw_is_torchs_fused_kernel_on_plain_tensors_and_steps_like_the_unfused_one():
    """make_optimizer's AdamW runs torch's fused kernel on plain CPU tensors (not on FSDP2's DTensor shards), and its
    updates are the for-loop AdamW's to float32 rounding."""
    from dpokit.train.loop import _fusable, make_optimizer

    generator = torch.Generator().manual_seed(0)
    fused_model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 4))
    plain_model, start = copy.deepcopy(fused_model), copy.deepcopy(fused_model)
    config = TrainConfig(model="m", data="d", output="o", optimizer="adamw", lr=1e-2, weight_decay=0.01)
    fused = make_optimizer(fused_model, config)
    plain = torch.optim.AdamW(plain_model.parameters(), lr=1e-2, weight_decay=0.01)
    assert fused.defaults["fused"] and not plain.defaults.get("fused")
    for _ in range(5):
        x = torch.randn(8, 16, generator=generator)
        for model, optimizer in ((fused_model, fused), (plain_model, plain)):
            model(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    for a, b, before in zip(fused_model.parameters(), plain_model.parameters(), start.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert (a - before).abs().max() > 1e-3  # it did move
    assert not _fusable([torch.nn.Parameter(torch.zeros(2, dtype=torch.int64), requires_grad=False)])
