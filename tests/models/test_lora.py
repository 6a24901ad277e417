"""LoRA and QLoRA: the reference inside the same weights, adapter-only outputs, reload, merge, resume, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from dpokit.api import EvalConfig, evaluate, generate, prepare_data
from dpokit.models.loading import load_model, load_tokenizer
from dpokit.train.policy import load_policy, merge
from dpokit.data.batching import collate
from dpokit.train.checkpoint import save_final
from dpokit.cli.main import main
from dpokit.config import TrainConfig
from dpokit.train.engine import Scorer
from dpokit.models.lora import LoraOptions, adapter_disabled, add_adapter
from dpokit.losses.dispatch import LossConfig
from dpokit.train.metrics import read_metrics
from dpokit.losses.objective import DPOObjective
from dpokit.train.reference import PolicyReference
from dpokit.train.loop import prepare, train

pytestmark = pytest.mark.usefixtures("single_thread")


def _batch(tokenizer, tiny_model_dir, sentiment_data, n=6):
    cfg = TrainConfig(model=tiny_model_dir, data=sentiment_data["eval"], output="-")
    examples = prepare_data(cfg, "dpo", tokenizer, log=lambda *_: None).train[:n]
    return collate(examples, list(range(len(examples))))


def _randomize_adapter(model, seed: int) -> None:
    """A fresh adapter computes exactly the base model (B = 0); give it weights so that a test can tell."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name and ".default." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _make_adapter_dir(tiny_model_dir, path, seed) -> str:
    """An adapter directory as an SFT LoRA run would leave it (non-zero weights, tokenizer alongside)."""
    model = add_adapter(load_model(tiny_model_dir), LoraOptions(r=4, alpha=8))
    _randomize_adapter(model, seed)
    model.save_pretrained(path)
    load_tokenizer(tiny_model_dir).save_pretrained(path)
    return str(path)


def test_adapter_disabled_log_probs_equal_the_base_model(tiny_model_dir, tokenizer, sentiment_data):
    batch = _batch(tokenizer, tiny_model_dir, sentiment_data)
    model = add_adapter(load_model(tiny_model_dir), LoraOptions(r=4, alpha=8))
    _randomize_adapter(model, seed=0)
    scorer = Scorer(model, reference_state=adapter_disabled)
    with torch.no_grad():
        base = Scorer(load_model(tiny_model_dir))(batch)
        reference, policy = scorer(batch, reference=True), scorer(batch)
    torch.testing.assert_close(reference, base, rtol=0, atol=1e-5)
    assert (policy - base).abs().max() > 1e-2  # the adapter does act outside the reference pass


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, sentiment_data, tokenizer, tmp_path_factory):
    """A fresh LoRA adapter trained in memory for 3 DPO steps, then saved: (model, weights before, final dir)."""
    out = tmp_path_factory.mktemp("lora-run")
    cfg = TrainConfig(model=tiny_model_dir, data=sentiment_data["train"], output=str(out), lora_r=4, lr=1e-2,
                      optimizer="adamw", warmup_steps=0, max_steps=3, batch_size=4)
    model, reference_state = load_policy(cfg, "cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    examples = prepare_data(cfg, "dpo", tokenizer, log=lambda *_: None).train
    engine = prepare(model, len(examples), cfg, Accelerator(), reference_state=reference_state, log=lambda *_: None)
    train(engine, tokenizer, DPOObjective(LossConfig(), PolicyReference()), examples, None, cfg)
    final = save_final(out / "final", engine, tokenizer)
    return model, before, final


def test_only_the_adapter_changes_and_the_output_is_the_adapter_alone(lora_run):
    model, before, final = lora_run
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_B" in n for n in changed)  # B starts at 0: it moved, so the policy left the reference
    assert {p.name for p in final.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"}
    assert not (final / "model.safetensors").exists()
    assert all("lora_" in k for k in load_file(str(final / "adapter_model.safetensors")))


def test_a_saved_adapter_reloads_and_merges_to_the_same_log_probs(lora_run, tiny_model_dir, tokenizer,
                                                                  sentiment_data, tmp_path):
    model, _, final = lora_run
    batch = _batch(tokenizer, tiny_model_dir, sentiment_data)
    model.eval()
    with torch.no_grad():
        trained = Scorer(model)(batch)
        reloaded = Scorer(load_model(str(final)))(batch)  # PeftModel.from_pretrained on the base
        merged_dir = merge(str(final), str(tmp_path / "merged"), log=lambda *_: None)
        merged = AutoModelForCausalLM.from_pretrained(merged_dir)
        merged_logps = Scorer(merged.eval())(batch)
    torch.testing.assert_close(reloaded, trained, rtol=0, atol=1e-5)
    torch.testing.assert_close(merged_logps, trained, rtol=0, atol=1e-4)
    assert not (Path(merged_dir) / "adapter_config.json").exists()  # a plain Hugging Face model


def test_eval_and_generate_take_an_adapter_directory(lora_run, tiny_model_dir, sentiment_data, capsys):
    _, _, final = lora_run
    assert main(["eval", "--model", str(final), "--ref-model", tiny_model_dir, "--data", sentiment_data["eval"],
                 "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["examples"] == 60 and metrics["rewards/margins"] != 0
    # against itself the rewards are exactly zero: the adapter is applied on both sides
    same = evaluate(EvalConfig(model=str(final), data=sentiment_data["eval"], ref_model=str(final)),
                               log=lambda *_: None)
    assert same["rewards/margins"] == 0 and same["loss"] == pytest.approx(0.6931, abs=1e-4)
    texts = generate(str(final), ["the film"], max_new_tokens=4, num_samples=2)
    assert len(texts) == 1 and len(texts[0]) == 2


def _first_rewards(out) -> dict:
    row = [r for r in read_metrics(Path(out) / "metrics.jsonl") if r["split"] == "train"][0]
    return {k: row[k] for k in ("rewards/chosen", "rewards/rejected")}


@pytest.mark.parametrize("precompute", [False, True])
def test_a_run_from_an_adapter_compares_against_that_adapter_not_the_bare_base(precompute, tiny_model_dir,
                                                                                sentiment_data, tmp_path):
    """Before the first update the policy is base + adapter, so the step-1 rewards must be exactly 0; a
    reference of the bare base (adapter disabled) would give non-zero rewards. --ref-adapter picks another."""
    start = _make_adapter_dir(tiny_model_dir, tmp_path / "sft-lora", seed=1)
    other = _make_adapter_dir(tiny_model_dir, tmp_path / "other-lora", seed=2)
    args = ["dpo", "--data", sentiment_data["train"], "--max-steps", "1", "--batch-size", "4", "--lr", "1e-3",
            "--warmup-steps", "0", "--no-save-final"] + (["--precompute-ref"] if precompute else [])
    assert main(args + ["--model", start, "--output", str(tmp_path / "own")]) == 0
    assert _first_rewards(tmp_path / "own") == {"rewards/chosen": 0.0, "rewards/rejected": 0.0}
    assert main(args + ["--model", start, "--ref-adapter", other, "--output", str(tmp_path / "other")]) == 0
    assert all(abs(v) > 1e-3 for v in _first_rewards(tmp_path / "other").values())
    # and the bare base is indeed a different reference from the starting adapter
    assert main(args + ["--model", start, "--ref-model", tiny_model_dir, "--output", str(tmp_path / "base")]) == 0
    assert all(abs(v) > 1e-3 for v in _first_rewards(tmp_path / "base").values())


def test_qlora_trains_and_resumes_exactly(tiny_model_dir, sentiment_data, tmp_path):
    """4-bit NF4 base (bitsandbytes on CPU) + LoRA: loss moves; a resume from checkpoint 2 of 4 gives the same
    adapter and metrics as the uninterrupted run."""
    args = ["dpo", "--model", tiny_model_dir, "--data", sentiment_data["train"], "--load-in-4bit", "--lora-r", "4",
            "--batch-size", "4", "--max-steps", "4", "--save-every", "2", "--lr", "1e-2", "--warmup-steps", "1",
            "--optimizer", "adamw", "--schedule", "cosine"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(args + ["--output", str(full)]) == 0
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoint-000004")
    shutil.rmtree(cut / "final")
    rows = read_metrics(cut / "metrics.jsonl")
    (cut / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= 2))
    assert main(args + ["--output", str(cut), "--resume"]) == 0
    a = [r for r in read_metrics(full / "metrics.jsonl") if r["split"] == "train"]
    b = [r for r in read_metrics(cut / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a[2:], b[2:]):
        for key in ("loss", "grad_norm", "lr", "rewards/margins"):
            assert ra[key] == pytest.approx(rb[key], abs=1e-6, rel=1e-6), (ra["step"], key)
    assert a[-1]["loss"] < a[0]["loss"]
    wa, wb = (load_file(str(p / "final" / "adapter_model.safetensors")) for p in (full, cut))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    quantized = load_policy(TrainConfig(model=tiny_model_dir, data="d", output="o", lora_r=4, load_in_4bit=True),
                            "cpu")[0]
    assert any(type(m).__name__ == "Linear4bit" for m in quantized.modules())


def test_gradient_checkpointing_changes_no_number(tiny_model_dir, sentiment_data, tmp_path):
    args = ["dpo", "--model", tiny_model_dir, "--data", sentiment_data["train"], "--batch-size", "4",
            "--max-steps", "2", "--lr", "1e-3", "--warmup-steps", "0"]
    assert main(args + ["--output", str(tmp_path / "plain")]) == 0
    assert main(args + ["--output", str(tmp_path / "ckpt"), "--gradient-checkpointing"]) == 0
    wa, wb = (load_file(str(tmp_path / name / "final" / "model.safetensors")) for name in ("plain", "ckpt"))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6
    model = load_policy(TrainConfig(model=tiny_model_dir, data="d", output="o", gradient_checkpointing=True), "cpu")[0]
    assert all(layer.gradient_checkpointing for layer in model.model.layers)  # really on, in every layer


def test_an_8bit_optimizer_keeps_8bit_states_and_trains(tiny_model_dir, sentiment_data, tmp_path):
    """bitsandbytes' AdamW8bit (full fine-tuning: it keeps tensors under 4096 elements, like LoRA's, in 32 bits)."""
    out = tmp_path / "adam8"
    assert main(["dpo", "--model", tiny_model_dir, "--data", sentiment_data["train"], "--output", str(out),
                 "--optimizer", "adamw8bit", "--batch-size", "4", "--max-steps", "2", "--lr", "1e-2",
                 "--warmup-steps", "0", "--save-every", "1"]) == 0
    state = load_file(str(out / "checkpoint-000001" / "trainer_state.safetensors"))
    assert any(v.dtype == torch.uint8 for k, v in state.items() if k.startswith("optimizer."))  # 8-bit states
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]
    assert rows[1]["loss"] < rows[0]["loss"]
    # and its nested 8-bit state round-trips: a resume from step 1 reproduces step 2
    shutil.rmtree(out / "checkpoint-000002")
    shutil.rmtree(out / "final")
    (out / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\n")
    assert main(["dpo", "--model", tiny_model_dir, "--data", sentiment_data["train"], "--output", str(out),
                 "--optimizer", "adamw8bit", "--batch-size", "4", "--max-steps", "2", "--lr", "1e-2",
                 "--warmup-steps", "0", "--save-every", "1", "--resume"]) == 0
    again = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]
    assert again[1]["loss"] == pytest.approx(rows[1]["loss"], abs=1e-6)
    assert again[1]["grad_norm"] == pytest.approx(rows[1]["grad_norm"], abs=1e-6)


@pytest.mark.parametrize("flags,message", [
    (["--lora-r", "4", "--lora-target-modules", "q_proj,nope"], "has no module named nope"),
    (["--load-in-4bit"], "quantized weights cannot be trained directly"),
    (["--lora-r", "4", "--load-in-4bit", "--load-in-8bit"], "exclude each other"),
    (["--ref-adapter", "somewhere"], "applies when --model is a LoRA adapter"),
    (["--lora-alpha", "8"], "needs --lora-r"),
    (["--use-dora"], "--use-dora needs --lora-r"),
    (["--use-rslora"], "--use-rslora needs --lora-r"),
    (["--lora-modules-to-save", "lm_head"], "--lora-modules-to-save needs --lora-r"),
    (["--lora-r", "4", "--lora-modules-to-save", "lm_head,nope"], "--lora-modules-to-save: LlamaForCausalLM has no module named nope"),
    (["--lora-r", "4", "--ref-offload"], "this run has none"),
])
def test_bad_lora_options_are_one_line_errors(flags, message, tiny_model_dir, sentiment_data, tmp_path, capsys):
    code = main(["dpo", "--model", tiny_model_dir, "--data", sentiment_data["train"], "--output",
                 str(tmp_path / "x"), "--max-steps", "1"] + flags)
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_lora_in_bfloat16_stores_the_frozen_base_in_bfloat16(tiny_model_dir, sentiment_data, tmp_path):
    cfg = TrainConfig(model=tiny_model_dir, data="d", output="o", lora_r=4, dtype="bfloat16")
    model = load_policy(cfg, "cpu")[0]
    dtypes = {p.dtype for n, p in model.named_parameters() if "lora_" not in n}
    assert dtypes == {torch.bfloat16}  # half the memory of a float32 base
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    out = tmp_path / "bf16"
    assert main(["dpo", "--model", tiny_model_dir, "--data", sentiment_data["train"], "--output", str(out),
                 "--lora-r", "4", "--dtype", "bfloat16", "--batch-size", "4", "--max-steps", "2", "--lr", "1e-2",
                 "--warmup-steps", "0", "--optimizer", "adamw"]) == 0
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows) and rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3)
