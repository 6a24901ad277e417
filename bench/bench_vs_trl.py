#!/usr/bin/env python
"""Speed and memory of dpokit's DPO training step against TRL's DPOTrainer, on the same model and data.

One command does everything (see bench/README.md):

    python bench/bench_vs_trl.py                 # default shape, 3 interleaved rounds
    python bench/bench_vs_trl.py --quick         # tiny shape, seconds: checks that the harness works

What it does:

1. Builds, in a temporary work directory, a byte-level BPE tokenizer (vocabulary 8192, trained on generated
   text from a synthetic Zipf-distributed word list), a randomly initialised ``LlamaForCausalLM`` and a
   preference data set whose prompts and responses are generated *by token count* (default prompts ~200
   tokens, responses ~120, each uniform within ±30%), written as JSONL (read by dpokit) and given to TRL as an
   in-memory ``datasets.Dataset`` holding the same rows in the order dpokit's first epoch visits them, with
   TRL's sampler set to sequential, so both train on the same batches step for step.
2. Runs every system in its own child process (so peak RSS is per run), in interleaved rounds
   ``[dpokit, TRL, dpokit precompute, TRL precompute, dpokit ablations...] x rounds``:
   * dpokit through its own trainer (``dpokit.api.train_dpo``), seconds per step read from the trainer's
     ``metrics.jsonl`` rows; TRL through ``DPOTrainer.train()``, seconds per step from a TrainerCallback (time
     between consecutive ``on_step_end``, i.e. the whole step including data loading and logging).
   * Same batch size, max length, float32, AdamW, torch threads, learning rate; TRL with gradient
     checkpointing off and ``bf16=False``. The first ``--warmup`` steps of every run are discarded.
   * Tokens per step = prompt + response tokens of every sequence, the prompt counted once per response (what
     dpokit's trainer logs, and exactly the non-padding tokens TRL's batch holds).
   * Reference log-prob precomputation is timed separately and is not part of any step time.
3. Measures the machine's float32 matrix-multiply rate (before and after the rounds, with the same thread
   count) and reports dpokit's achieved FLOP/s as a fraction of it (an estimate; formula in the README).
4. Checks exactness on a batch of the benchmark data: log-probs, DPO losses and the gradients of every
   parameter with every optimisation on (packed layout, chunked response-only logits, forward groups) against every
   optimisation off (plain padded layout, full logits).
5. Prints a markdown table and writes everything to ``bench/results/<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
EOT = "<|endoftext|>"

# name -> (kind, options). Kind "dpokit" options are TrainConfig fields; kind "trl" options are DPOConfig fields.
SYSTEMS = {
    "dpokit": ("dpokit", {"layout": "packed", "logits": "chunked", "precompute_ref": False, "forward_tokens": None}),
    "trl": ("trl", {"precompute_ref_log_probs": False}),
    "dpokit-precompute": ("dpokit", {"layout": "packed", "logits": "chunked", "precompute_ref": True,
                                     "forward_tokens": None}),
    "trl-precompute": ("trl", {"precompute_ref_log_probs": True}),
    # ablations (reference model in memory), from every optimisation off to every optimisation on
    "dpokit-plain-full": ("dpokit", {"layout": "plain", "logits": "full", "precompute_ref": False, "forward_tokens": 0}),
    "dpokit-plain-chunked": ("dpokit", {"layout": "plain", "logits": "chunked", "precompute_ref": False,
                                        "forward_tokens": 0}),
    "dpokit-shared-chunked": ("dpokit", {"layout": "shared", "logits": "chunked", "precompute_ref": False,
                                         "forward_tokens": 0}),
    "dpokit-packed-whole": ("dpokit", {"layout": "packed", "logits": "chunked", "precompute_ref": False,
                                       "forward_tokens": 0}),
}
DEFAULT_SYSTEMS = list(SYSTEMS)
PAIRS = [("dpokit", "trl"), ("dpokit-precompute", "trl-precompute")]


# --------------------------------------------------------------------------------------------------------------
# memory helpers (Linux /proc; ru_maxrss as fallback)


def _proc_status(field: str) -> float | None:
    """A ``kB`` field of /proc/self/status, in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mib() -> float | None:
    """Current resident set size, MiB."""
    return _proc_status("VmRSS")


def peak_rss_mib() -> float:
    """Peak resident set size of this process over its lifetime, MiB (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_hwm() -> bool:
    """Reset the VmHWM high-water mark (Linux: write 5 to /proc/self/clear_refs); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------------------------
# building the model, tokenizer and data


def _words(rng: random.Random, count: int) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    words: set[str] = set()
    while len(words) < count:
        words.add("".join(rng.choice(letters) for _ in range(rng.randint(2, 9))))
    return sorted(words)


def _zipf_sampler(rng: random.Random, words: list[str]):
    weights = [1.0 / (rank + 1) ** 1.05 for rank in range(len(words))]
    order = words[:]
    rng.shuffle(order)

    def sample(n: int) -> list[str]:
        return rng.choices(order, weights=weights, k=n)

    return sample


def build_tokenizer(sample, vocab_size: int, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [" ".join(sample(60)) for _ in range(8000)]
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, pad_token=EOT,
                                   unk_token=None)
    fast.save_pretrained(out)
    return fast


def text_of_tokens(tokenizer, sample, n: int, leading_space: bool) -> str:
    """Text that the tokenizer encodes into exactly (or, rarely, about) `n` tokens."""
    text = (" " if leading_space else "") + " ".join(sample(n + 8))
    enc = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    text = text[: enc.offsets[n - 1][1]]
    return text


def build_everything(args, work: Path) -> dict:
    """Tokenizer, model (saved), preference data (JSONL + TRL-ordered JSONL); returns a description."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    rng = random.Random(args.seed)
    sample = _zipf_sampler(rng, _words(rng, 6000))
    model_dir = work / "model"
    tokenizer = build_tokenizer(sample, args.vocab, model_dir)

    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate or 4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=max(1024, args.max_length), tie_word_embeddings=False,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
        attention_dropout=0.0,
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(model_dir, safe_serialization=True)
    params = {name: p.numel() for name, p in model.named_parameters()}
    total = sum(params.values())
    embed = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel()
    del model

    def length(mean: int) -> int:
        return max(4, round(mean * rng.uniform(1 - args.spread, 1 + args.spread)))

    rows = []
    for i in range(args.pairs):
        p = length(args.prompt_len)
        # the response lengths include the EOS token that both libraries append
        c, r = length(args.response_len) - 1, length(args.response_len) - 1
        rows.append({
            "prompt": text_of_tokens(tokenizer, sample, p, leading_space=False),
            "chosen": text_of_tokens(tokenizer, sample, c, leading_space=True),
            "rejected": text_of_tokens(tokenizer, sample, r, leading_space=True),
        })
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))

    # Token lengths as dpokit tokenises them (and check that nothing is filtered or truncated)
    from dpokit.api import prepare_data
    from dpokit.config import TrainConfig

    cfg = TrainConfig(model=str(model_dir), data=str(data), output=str(work / "probe"), max_length=args.max_length,
                      max_prompt_length=min(args.max_length - 1, 256 if args.max_length > 256 else args.max_length // 2))
    examples = prepare_data(cfg, "dpo", tokenizer, log=lambda *_: None).train
    if len(examples) != len(rows):
        raise SystemExit(f"dpokit kept {len(examples)} of {len(rows)} pairs; lengths exceed --max-length?")
    prompt_lens = [len(e.prompt_ids) for e in examples]
    resp_lens = [len(r) for e in examples for r in e.responses]
    if max(p + max(map(len, e.responses)) for p, e in zip(prompt_lens, examples)) > args.max_length:
        raise SystemExit("a sequence exceeds --max-length")

    # TRL reads the rows in the order dpokit's trainer visits them in epoch 0 (its sampler is made sequential)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(args.seed)).tolist()
    (work / "pairs_trl_order.jsonl").write_text("".join(json.dumps(rows[i]) + "\n" for i in order))

    def stats(xs):
        return {"mean": round(statistics.mean(xs), 1), "min": min(xs), "max": max(xs)}

    return {
        "model_dir": str(model_dir), "data": str(data), "data_trl": str(work / "pairs_trl_order.jsonl"),
        "max_prompt_length": cfg.max_prompt_length,
        "model": {"arch": "LlamaForCausalLM (random init)", "vocab": args.vocab, "tokenizer_vocab": len(tokenizer),
                  "hidden": args.hidden, "layers": args.layers, "heads": args.heads,
                  "intermediate": config.intermediate_size, "tied_embeddings": False,
                  "params_total": total, "params_embedding": embed, "params_lm_head": head,
                  "params_decoder_layers": total - embed - head},
        "data_stats": {"pairs": len(rows), "prompt_tokens": stats(prompt_lens),
                       "response_tokens_incl_eos": stats(resp_lens)},
    }


# --------------------------------------------------------------------------------------------------------------
# FLOP estimates (see README): linear layers 2*params*positions per forward, attention 4*rows*width^2*hidden per
# layer per forward (dense, as SDPA with a mask computes it), training = 3x forward (fwd + bwd), reference = 1x.


def forward_flops(m: dict, rows: int, width: int, head_positions: int) -> float:
    layers = 2.0 * m["params_decoder_layers"] * rows * width
    attention = 4.0 * m["layers"] * rows * width * width * m["hidden"]
    head = 2.0 * m["params_lm_head"] * head_positions
    return layers + attention + head


def batch_shapes(batch, examples) -> dict:
    """What dpokit computes for this batch, and what a padded concatenated (TRL) step computes for it."""
    rows, width = batch.input_ids.shape
    targets = int(batch.target_ids.numel())
    seq_lens = [len(e.prompt_ids) + len(r) for e in examples for r in e.responses]
    return {"rows": rows, "width": width, "targets": targets, "seq_lens": seq_lens}


# --------------------------------------------------------------------------------------------------------------
# children


def child_dpokit(spec: dict) -> dict:
    base_rss = rss_mib()
    import torch

    torch.set_num_threads(spec["threads"])
    import dpokit.api as api
    import dpokit.trainer as trainer
    from dpokit.config import TrainConfig

    after_import_rss = rss_mib()
    shapes: list[dict] = []
    marks: dict = {}
    real_collate, real_step_indices = trainer.collate, trainer.step_indices

    def step_indices(*a, **k):  # called once at the start of every training step
        shapes.append([])
        return real_step_indices(*a, **k)

    def collate(examples, ids, **kw):  # record what each training step computes (one entry per forward pass)
        batch = real_collate(examples, ids, **kw)
        if shapes:
            shapes[-1].append(batch_shapes(batch, examples))
        return batch

    trainer.collate, trainer.step_indices = collate, step_indices

    def no_checkpoint(*a, **k):  # the trainer checkpoints at its last step: not part of the benchmark
        marks["peak_before_checkpoint_mib"] = peak_rss_mib()

    trainer.save_checkpoint = no_checkpoint

    real_cached = api.cached_reference_logps

    def cached(*a, **k):
        t = time.perf_counter()
        out = real_cached(*a, **k)
        marks["precompute_seconds"] = time.perf_counter() - t
        return out

    api.cached_reference_logps = cached
    real_train = api.train

    def train(*a, **k):
        marks["rss_before_train_mib"] = rss_mib()
        marks["hwm_reset"] = reset_hwm()
        return real_train(*a, **k)

    api.train = train

    opts = spec["options"]
    config = TrainConfig(
        model=spec["model_dir"], data=spec["data"], output=spec["output"], batch_size=spec["batch_size"],
        max_length=spec["max_length"], max_prompt_length=spec["max_prompt_length"], max_steps=spec["steps"],
        optimizer="adamw", lr=1e-6, warmup_steps=0, dtype="float32", seed=spec["seed"], save_final=False,
        save_every=0, log_every=1, layout=opts["layout"], logits=opts["logits"],
        precompute_ref=opts["precompute_ref"], forward_tokens=opts["forward_tokens"],
    )
    api.train_dpo(config)
    from dpokit.metrics import read_metrics

    rows = [r for r in read_metrics(Path(spec["output"]) / "metrics.jsonl") if r["split"] == "train"]
    return {
        "seconds_per_step": [r["seconds_per_step"] for r in rows],
        "tokens_per_step": [round(r["tokens_per_second"] * r["seconds_per_step"]) for r in rows],
        "loss": [r["loss"] for r in rows],
        "shapes": shapes,
        "precompute_seconds": marks.get("precompute_seconds"),
        "rss_start_mib": base_rss, "rss_after_import_mib": after_import_rss,
        "rss_before_train_mib": marks.get("rss_before_train_mib"),
        "peak_rss_mib": marks.get("peak_before_checkpoint_mib", peak_rss_mib()),
        "train_peak_rss_mib": _proc_status("VmHWM") if marks.get("hwm_reset") else None,
    }


def child_trl(spec: dict) -> dict:
    base_rss = rss_mib()
    import torch

    torch.set_num_threads(spec["threads"])
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    datasets.disable_progress_bars()
    after_import_rss = rss_mib()
    opts = spec["options"]
    rows = [json.loads(line) for line in Path(spec["data_trl"]).read_text().splitlines()]
    dataset = datasets.Dataset.from_list(rows)
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    ref_model = None
    if not opts["precompute_ref_log_probs"]:
        ref_model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)

    class Timer(TrainerCallback):
        def __init__(self):
            self.begin, self.end = [], []

        def on_step_begin(self, args, state, control, **kw):
            self.begin.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            self.end.append(time.perf_counter())

    timer = Timer()
    tokens: list[int] = []

    class Trainer(DPOTrainer):
        def training_step(self, model, inputs, *a, **k):
            tokens.append(int(inputs["attention_mask"].sum()))
            return super().training_step(model, inputs, *a, **k)

        def _precompute_ref_logps(self, *a, **k):
            t = time.perf_counter()
            out = super()._precompute_ref_logps(*a, **k)
            marks["precompute_seconds"] = marks.get("precompute_seconds", 0.0) + time.perf_counter() - t
            return out

    marks: dict = {}
    config = DPOConfig(
        output_dir=spec["output"], per_device_train_batch_size=spec["batch_size"], gradient_accumulation_steps=1,
        max_length=spec["max_length"], max_steps=spec["steps"], learning_rate=1e-6, lr_scheduler_type="constant",
        warmup_steps=0, optim="adamw_torch", gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True,
        report_to=[], logging_steps=1, save_strategy="no", dataloader_num_workers=0, dataloader_pin_memory=False,
        disable_tqdm=True, seed=spec["seed"], train_sampling_strategy="sequential", beta=0.1,
        precompute_ref_log_probs=opts["precompute_ref_log_probs"],
    )
    trainer = Trainer(model=model, ref_model=ref_model, args=config, train_dataset=dataset,
                      processing_class=tokenizer, callbacks=[timer])
    rss_before = rss_mib()
    hwm_reset = reset_hwm()
    trainer.train()
    steps = len(timer.end)
    seconds = [timer.end[0] - timer.begin[0]] + [timer.end[i] - timer.end[i - 1] for i in range(1, steps)]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "seconds_per_step": seconds,
        "seconds_per_step_compute_only": [e - b for b, e in zip(timer.begin, timer.end)],
        "tokens_per_step": tokens[:steps],
        "loss": losses,
        "precompute_seconds": marks.get("precompute_seconds"),
        "rss_start_mib": base_rss, "rss_after_import_mib": after_import_rss, "rss_before_train_mib": rss_before,
        "peak_rss_mib": peak_rss_mib(),
        "train_peak_rss_mib": _proc_status("VmHWM") if hwm_reset else None,
    }


def run_child(spec: dict, work: Path, name: str, round_: int) -> dict:
    spec_path = work / f"spec_{name}_{round_}.json"
    out_path = work / f"result_{name}_{round_}.json"
    spec = dict(spec, result=str(out_path), output=str(work / f"run_{name}_{round_}"))
    spec_path.write_text(json.dumps(spec))
    threads = str(spec["threads"])
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_CACHE=str(work / "hf_datasets_cache"), TQDM_DISABLE="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1", PYTHONWARNINGS="ignore")
    log = work / f"log_{name}_{round_}.txt"
    started = time.perf_counter()
    with log.open("w") as handle:
        proc = subprocess.run([sys.executable, __file__, "--child", str(spec_path)], stdout=handle,
                              stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0 or not out_path.exists():
        tail = log.read_text()[-4000:]
        raise SystemExit(f"{name} (round {round_}) failed with exit code {proc.returncode}; log tail:\n{tail}")
    result = json.loads(out_path.read_text())
    result["child_wall_seconds"] = time.perf_counter() - started
    shutil.rmtree(spec["output"], ignore_errors=True)
    return result


# --------------------------------------------------------------------------------------------------------------
# matmul rate and exactness (parent)


def matmul_gflops(threads: int, size: int, repeats: int = 5) -> float:
    """Best-of-`repeats` float32 [size x size] @ [size x 4 size] rate in GFLOP/s with `threads` threads."""
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(size, size)
    b = torch.randn(size, 4 * size)
    torch.mm(a, b)
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(3):
            torch.mm(a, b)
        best = min(best, (time.perf_counter() - t) / 3)
    return 2.0 * size * size * 4 * size / best / 1e9


def exactness(setup: dict, args) -> dict:
    """Log-probs, losses and gradients: every optimisation on (packed, chunked, forward groups) vs off (plain, full)."""
    import copy

    import torch
    from dpokit.api import load_model, load_tokenizer, prepare_data
    from dpokit.batching import collate, forward_groups
    from dpokit.config import TrainConfig
    from dpokit.logprobs import sequence_logprobs, token_logprobs
    from dpokit.losses import LossConfig
    from dpokit.objective import DPOObjective
    from dpokit.reference import ModelReference

    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(setup["model_dir"])
    cfg = TrainConfig(model=setup["model_dir"], data=setup["data"], output="-", max_length=args.max_length,
                      max_prompt_length=setup["max_prompt_length"])
    examples = prepare_data(cfg, "dpo", tokenizer, log=lambda *_: None).train[: args.batch_size]
    ids = list(range(len(examples)))
    reference_model = load_model(setup["model_dir"])
    policy = copy.deepcopy(reference_model)
    with torch.no_grad():  # move the policy away from the reference so that losses and gradients are generic
        gen = torch.Generator().manual_seed(1)
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02 * (p.std() if p.numel() > 1 else 1))
    policy.train()
    pad = tokenizer.pad_token_id
    out = {}
    for name, layout, chunked in (("on", "packed", True), ("off", "plain", False), ("shared", "shared", True)):
        batch = collate(examples, ids, layout=layout, pad_token_id=pad)
        policy.zero_grad(set_to_none=True)
        objective = DPOObjective(LossConfig(beta=0.1), ModelReference(reference_model, chunked=chunked),
                                 chunked=chunked)
        with torch.no_grad():
            tokens = token_logprobs(policy, batch, chunked=chunked)
            ref = sequence_logprobs(reference_model, batch, chunked=chunked)
        seqs = sequence_logprobs(policy, batch, chunked=chunked)
        result = objective(policy, batch)
        (result.loss_sum / objective.divisor(batch)).backward()
        from dpokit.losses import preference_loss

        with torch.no_grad():
            losses = preference_loss(seqs[0::2], seqs[1::2], ref[0::2], ref[1::2], LossConfig(beta=0.1)).losses
        loss = (result.loss_sum / objective.divisor(batch)).detach()
        if name == "on":  # the trainer's default path also splits the batch into forward groups (CPU)
            policy.zero_grad(set_to_none=True)
            loss = torch.zeros(())
            for group in forward_groups(ids, examples, 1024):
                part = objective(policy, collate([examples[i] for i in group], group, layout=layout,
                                                 pad_token_id=pad))
                (part.loss_sum / objective.divisor(batch)).backward()
                loss += (part.loss_sum / objective.divisor(batch)).detach()
        out[name] = {
            "target_ids": batch.target_ids, "token_logps": tokens, "policy_logps": seqs.detach(),
            "reference_logps": ref, "losses": losses, "loss": loss,
            "grads": {n: p.grad.detach().clone() for n, p in policy.named_parameters()},
        }

    def compare(a, b) -> dict:
        diff = (a - b).abs()
        scale = b.abs()
        return {"max_abs": diff.max().item(), "max_rel": (diff / scale.clamp_min(1e-30)).max().item(),
                "max_abs_over_max_value": (diff.max() / scale.max().clamp_min(1e-30)).item(),
                "allclose_1e-5": bool(torch.allclose(a, b, rtol=1e-5, atol=1e-5)), "max_value": scale.max().item()}

    report = {}
    on, off = out["on"], out["off"]
    assert torch.equal(on["target_ids"], off["target_ids"]), "target order differs between layouts"
    for key in ("token_logps", "policy_logps", "reference_logps", "losses", "loss"):
        report[key] = compare(on[key].reshape(-1), off[key].reshape(-1))
    per_param = {n: compare(on["grads"][n], off["grads"][n]) for n in on["grads"]}
    flat_on = torch.cat([g.reshape(-1) for g in on["grads"].values()])
    flat_off = torch.cat([g.reshape(-1) for g in off["grads"].values()])
    report["grads_all_params"] = compare(flat_on, flat_off)
    report["grads_worst_param_by_rel_to_max"] = max(per_param.items(), key=lambda kv: kv[1]["max_abs_over_max_value"])
    report["grads_all_params_allclose_1e-5"] = all(v["allclose_1e-5"] for v in per_param.values())
    report["shared_vs_off_policy_logps"] = compare(out["shared"]["policy_logps"], off["policy_logps"])
    report["batch"] = {"pairs": len(examples), "scored_tokens": int(on["target_ids"].numel())}
    report["pass"] = all(report[k]["allclose_1e-5"] for k in ("token_logps", "policy_logps", "reference_logps",
                                                               "losses", "loss", "grads_all_params"))
    return report


# --------------------------------------------------------------------------------------------------------------
# summary


def _med(xs):
    return statistics.median(xs) if xs else float("nan")


def summarise(results: dict, setup: dict, args, gflops: list[float]) -> dict:
    m = setup["model"]
    peak = max(gflops) * 1e9
    systems = {}
    for name, runs in results.items():
        per_round = []
        for r in runs:
            w = args.warmup
            sec = r["seconds_per_step"][w:]
            tok = r["tokens_per_step"][w:]
            entry = {"seconds_per_step": _med(sec), "tokens_per_second": sum(tok) / sum(sec),
                     "peak_rss_mib": r["peak_rss_mib"], "train_peak_rss_mib": r.get("train_peak_rss_mib"),
                     "rss_after_import_mib": r["rss_after_import_mib"],
                     "peak_minus_import_mib": r["peak_rss_mib"] - r["rss_after_import_mib"],
                     "precompute_seconds": r.get("precompute_seconds")}
            if r.get("shapes"):
                shapes = r["shapes"][w:len(r["seconds_per_step"])]
                kind, opts = SYSTEMS[name]
                ref = 0 if opts.get("precompute_ref") else 1
                executed, useful = [], []
                for passes in shapes:  # one training step: the forward passes it ran
                    flops = 0.0
                    for s in passes:
                        head = s["targets"] if opts["logits"] == "chunked" else s["rows"] * s["width"]
                        flops += (3 + ref) * forward_flops(m, s["rows"], s["width"], head)
                    executed.append(flops)
                    lens = [n for s in passes for n in s["seq_lens"]]  # TRL: every sequence padded to the longest
                    useful.append((3 + ref) * forward_flops(m, len(lens), max(lens), len(lens) * max(lens)))
                entry["executed_flops_per_second"] = sum(executed) / sum(sec)
                entry["executed_fraction_of_matmul"] = entry["executed_flops_per_second"] / peak
                entry["trl_equivalent_flops_per_second"] = sum(useful) / sum(sec)
                entry["trl_equivalent_fraction_of_matmul"] = entry["trl_equivalent_flops_per_second"] / peak
            per_round.append(entry)
        agg = {}
        for key in per_round[0]:
            vals = [e[key] for e in per_round if e[key] is not None]
            if vals:
                agg[key] = {"median": _med(vals), "min": min(vals), "max": max(vals)}
        systems[name] = {"per_round": per_round, "summary": agg}
    ratios = {}
    for a, b in PAIRS:
        if a in systems and b in systems:
            ra, rb = systems[a]["per_round"], systems[b]["per_round"]
            rr = {
                "throughput (tokens/s, dpokit / TRL)": [x["tokens_per_second"] / y["tokens_per_second"] for x, y in zip(ra, rb)],
                "seconds/step (TRL / dpokit)": [y["seconds_per_step"] / x["seconds_per_step"] for x, y in zip(ra, rb)],
                "peak RSS (dpokit / TRL)": [x["peak_rss_mib"] / y["peak_rss_mib"] for x, y in zip(ra, rb)],
                "peak RSS above imports (dpokit / TRL)": [x["peak_minus_import_mib"] / y["peak_minus_import_mib"] for x, y in zip(ra, rb)],
            }
            same = all(x["tokens_per_step"] == y["tokens_per_step"] for x, y in zip(results[a], results[b]))
            if all(x["train_peak_rss_mib"] and y["train_peak_rss_mib"] for x, y in zip(ra, rb)):
                rr["training-phase peak RSS (dpokit / TRL)"] = [x["train_peak_rss_mib"] / y["train_peak_rss_mib"] for x, y in zip(ra, rb)]
            ratios[f"{a} vs {b}"] = {k: {"median": _med(v), "min": min(v), "max": max(v), "per_round": v} for k, v in rr.items()}
            ratios[f"{a} vs {b}"]["same_batches"] = same  # identical tokens per step in every round
    return {"systems": systems, "ratios": ratios}


def _fmt(agg: dict | None, scale=1.0, digits=2) -> str:
    if not agg:
        return "–"
    return f"{agg['median'] * scale:.{digits}f} ({agg['min'] * scale:.{digits}f}–{agg['max'] * scale:.{digits}f})"


def table(summary: dict, gflops: list[float]) -> str:
    lines = ["| system | s/step | tokens/s | peak RSS MiB | RSS above imports MiB | training-phase peak MiB | precompute s | executed GFLOP/s (% of matmul) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, s in summary["systems"].items():
        a = s["summary"]
        fl = "–"
        if "executed_flops_per_second" in a:
            fl = f"{a['executed_flops_per_second']['median'] / 1e9:.1f} ({a['executed_fraction_of_matmul']['median'] * 100:.0f}%)"
        lines.append(f"| {name} | {_fmt(a['seconds_per_step'], digits=3)} | {_fmt(a['tokens_per_second'], digits=0)} | "
                     f"{_fmt(a['peak_rss_mib'], digits=0)} | {_fmt(a['peak_minus_import_mib'], digits=0)} | "
                     f"{_fmt(a.get('train_peak_rss_mib'), digits=0)} | {_fmt(a.get('precompute_seconds'), digits=2)} | {fl} |")
    lines += ["", "| ratio | median (min–max over rounds) |", "|---|---|"]
    for pair, rr in summary["ratios"].items():
        for k, v in rr.items():
            if isinstance(v, dict):
                lines.append(f"| {pair}: {k} | {_fmt(v)} |")
        lines.append(f"| {pair}: same batches (tokens per step identical) | {rr['same_batches']} |")
    lines += ["", f"float32 matmul rate: {', '.join(f'{g:.1f}' for g in gflops)} GFLOP/s (max used as the machine rate)"]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--steps", type=int, default=6, help="training steps per run (default 6)")
    parser.add_argument("--warmup", type=int, default=2, help="steps discarded at the start of each run (default 2)")
    parser.add_argument("--batch-size", type=int, default=8, help="preference pairs per step (default 8)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--pairs", type=int, default=64, help="preference pairs in the data set (default 64)")
    parser.add_argument("--prompt-len", type=int, default=200, help="mean prompt tokens (default 200)")
    parser.add_argument("--response-len", type=int, default=120, help="mean response tokens incl. EOS (default 120)")
    parser.add_argument("--spread", type=float, default=0.3, help="lengths uniform in mean x (1 ± spread)")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=None, help="MLP width (default 4 x hidden)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every run (default 2)")
    parser.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                        help=f"comma-separated subset of: {', '.join(SYSTEMS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--matmul-size", type=int, default=1024)
    parser.add_argument("--no-exactness", action="store_true", help="skip the exactness check")
    parser.add_argument("--workdir", help="keep the model, data and logs here (default: a temporary directory)")
    parser.add_argument("--out", default=str(HERE / "results"), help="directory for the JSON result")
    parser.add_argument("--quick", action="store_true",
                        help="tiny validation run: 1 round, 3 steps, 16 pairs of short sequences, hidden 64, 2 layers")
    args = parser.parse_args()

    if args.child:
        spec = json.loads(Path(args.child).read_text())
        result = (child_dpokit if spec["kind"] == "dpokit" else child_trl)(spec)
        Path(spec["result"]).write_text(json.dumps(result))
        return

    if args.quick:
        args.rounds, args.steps, args.warmup, args.pairs = 1, 3, 1, 16
        args.batch_size, args.prompt_len, args.response_len = 4, 40, 24
        args.hidden, args.layers, args.heads, args.max_length, args.matmul_size = 64, 2, 2, 128, 512
    names = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown:
        parser.error(f"unknown systems {unknown}; choose from {list(SYSTEMS)}")
    if args.pairs < args.batch_size * args.steps:
        args.pairs = args.batch_size * args.steps  # one epoch covers the run: every step sees new pairs

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="dpokit_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"building tokenizer, model and data in {work} ...", flush=True)
    setup = build_everything(args, work)
    m = setup["model"]
    print(f"model: {m['params_total'] / 1e6:.2f}M parameters ({m['params_decoder_layers'] / 1e6:.2f}M in decoder "
          f"layers, {m['params_lm_head'] / 1e6:.2f}M LM head, {m['params_embedding'] / 1e6:.2f}M embedding); "
          f"data: {json.dumps(setup['data_stats'])}", flush=True)

    gflops = [matmul_gflops(args.threads, args.matmul_size)]
    print(f"float32 matmul: {gflops[0]:.1f} GFLOP/s with {args.threads} threads", flush=True)

    spec_base = {"model_dir": setup["model_dir"], "data": setup["data"], "data_trl": setup["data_trl"],
                 "batch_size": args.batch_size, "max_length": args.max_length,
                 "max_prompt_length": setup["max_prompt_length"], "steps": args.steps, "threads": args.threads,
                 "seed": args.seed}
    results: dict[str, list] = {n: [] for n in names}
    for round_ in range(args.rounds):
        for name in names:
            kind, options = SYSTEMS[name]
            r = run_child(dict(spec_base, kind=kind, options=options), work, name, round_)
            results[name].append(r)
            w = args.warmup
            sec = r["seconds_per_step"][w:]
            print(f"round {round_ + 1}/{args.rounds} {name:24s} {_med(sec):7.3f} s/step  "
                  f"{sum(r['tokens_per_step'][w:]) / sum(sec):8.0f} tokens/s  peak RSS {r['peak_rss_mib']:7.0f} MiB  "
                  f"(child {r['child_wall_seconds']:.0f} s)", flush=True)
    gflops.append(matmul_gflops(args.threads, args.matmul_size))

    exact = None
    if not args.no_exactness:
        print("exactness check (every optimisation on vs off) ...", flush=True)
        exact = exactness(setup, args)

    summary = summarise(results, setup, args, gflops)
    text = table(summary, gflops)
    print()
    print(f"dpokit vs TRL {_trl_version()}: batch {args.batch_size} pairs, max_length {args.max_length}, float32, "
          f"{args.threads} threads, {args.steps} steps per run ({args.warmup} warm-up discarded), {args.rounds} rounds; "
          f"model {m['params_total'] / 1e6:.2f}M params (hidden {m['hidden']}, {m['layers']} layers, vocab {m['vocab']})")
    print("values: median (min–max over rounds)")
    print(text)
    if exact:
        print()
        print(f"exactness on {exact['batch']['pairs']} pairs ({exact['batch']['scored_tokens']} scored tokens), "
              f"packed+chunked+groups vs plain+full, float32: {'PASS' if exact['pass'] else 'FAIL'} (allclose rtol=atol=1e-5)")
        for key in ("token_logps", "policy_logps", "reference_logps", "losses", "loss", "grads_all_params"):
            v = exact[key]
            print(f"  {key:16s} max abs diff {v['max_abs']:.2e}  max |diff|/max |value| {v['max_abs_over_max_value']:.2e}"
                  f"  (max |value| {v['max_value']:.3g})  allclose {v['allclose_1e-5']}")
        worst_name, worst = exact["grads_worst_param_by_rel_to_max"]
        print(f"  worst gradient tensor {worst_name}: max abs diff {worst['max_abs']:.2e}, "
              f"relative to its max |value| {worst['max_abs_over_max_value']:.2e}; "
              f"every gradient tensor allclose: {exact['grads_all_params_allclose_1e-5']}")

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stamp}{'-quick' if args.quick else ''}.json"
    payload = {
        "args": vars(args), "setup": setup, "matmul_gflops": gflops, "summary": summary, "exactness": exact,
        "raw": results, "table_markdown": text, "wall_seconds": time.perf_counter() - t0,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "versions": _versions()},
    }
    path.write_text(json.dumps(payload, indent=1, default=str))
    print(f"\nwrote {path} ({time.perf_counter() - t0:.0f} s)")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


def _trl_version() -> str:
    try:
        import trl

        return trl.__version__
    except ImportError:
        return "?"


def _versions() -> dict:
    out = {}
    for mod in ("torch", "transformers", "trl", "datasets", "tokenizers", "accelerate", "dpokit"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            out[mod] = None
    return out


if __name__ == "__main__":
    main()
