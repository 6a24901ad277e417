"""The training runs of the child processes, shared by bench_vs_trl.py and bench_scale.py (``train_dpokit``,
``train_trl``), and bench_vs_trl.py's systems: one dpokit or TRL training run each, timed and with its memory
measured (the child's start, its environment and its memory readings: _setup.py)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from _setup import peak_rss_mib, proc_status, reset_hwm, rss_mib, start_child

# what a TRL child imports before its after-import mark (train_trl uses them): their memory counts as imports
TRL_IMPORTS = ("datasets", "trl:DPOConfig", "trl:DPOTrainer", "transformers:AutoModelForCausalLM")

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


# --------------------------------------------------------------------------------------------------------------
# children


def batch_shapes(batch, examples) -> dict:
    """What dpokit computes for this batch, and what a padded concatenated (TRL) step computes for it."""
    rows, width = batch.input_ids.shape
    targets = int(batch.target_ids.numel())
    seq_lens = [len(e.prompt_ids) + len(r) for e in examples for r in e.responses]
    return {"rows": rows, "width": width, "targets": targets, "seq_lens": seq_lens}


def train_dpokit(spec: dict, marks: dict, **config) -> dict:
    """Train with ``dpokit.api.train_dpo`` on the spec's model and data, with `config` as further TrainConfig
    fields and the end-of-run checkpoint skipped (the peak is read where it would start); return per-step seconds
    and tokens, losses and the memory marks. `marks` also collects what the caller's own patches record."""
    import dpokit.train.run as api
    from dpokit.config import TrainConfig
    from dpokit.train.metrics import read_metrics

    def no_checkpoint(*a, **k):
        marks["peak_before_checkpoint_mib"] = peak_rss_mib()

    # the trainer (or the engine that may replace it) imports save_checkpoint by name: patch it wherever it is
    patched = []
    for name, module in list(sys.modules.items()):
        if name.startswith("dpokit") and hasattr(module, "save_checkpoint"):
            module.save_checkpoint = no_checkpoint
            patched.append(name)
    real_train = api.train

    def train(*a, **k):
        marks["rss_before_train_mib"] = rss_mib()
        marks["hwm_reset"] = reset_hwm()
        return real_train(*a, **k)

    api.train = train
    api.train_dpo(TrainConfig(
        model=spec["model_dir"], data=spec["data"], output=spec["output"], batch_size=spec["batch_size"],
        max_length=spec["max_length"], max_prompt_length=spec["max_prompt_length"], max_steps=spec["steps"],
        optimizer="adamw", warmup_steps=0, dtype="float32", seed=spec["seed"], save_final=False, save_every=0,
        log_every=1, **config,
    ))
    rows = [r for r in read_metrics(Path(spec["output"]) / "metrics.jsonl") if r["split"] == "train"]
    return {
        "seconds_per_step": [r["seconds_per_step"] for r in rows],
        "tokens_per_step": [round(r["tokens_per_second"] * r["seconds_per_step"]) for r in rows],
        "loss": [r["loss"] for r in rows],
        "checkpoint_patched_in": patched,
        "rss_before_train_mib": marks.get("rss_before_train_mib"),
        "peak_rss_mib": marks.get("peak_before_checkpoint_mib", peak_rss_mib()),
        "train_peak_rss_mib": proc_status("VmHWM") if marks.get("hwm_reset") else None,
    }


def child_dpokit(spec: dict) -> dict:
    start = start_child(spec["threads"], "dpokit.api", "dpokit.train.loop")
    import dpokit.train.run as api
    import dpokit.train.loop as trainer

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
    real_cached = api.cached_reference_logps

    def cached(*a, **k):
        t = time.perf_counter()
        out = real_cached(*a, **k)
        marks["precompute_seconds"] = time.perf_counter() - t
        return out

    api.cached_reference_logps = cached
    opts = spec["options"]
    result = train_dpokit(spec, marks, lr=1e-6, layout=opts["layout"], logits=opts["logits"],
                          precompute_ref=opts["precompute_ref"], forward_tokens=opts["forward_tokens"])
    return {**result, "shapes": shapes, "precompute_seconds": marks.get("precompute_seconds"), **start}


def step_timer():
    """A transformers TrainerCallback that records when each optimizer step of a Trainer begins and ends."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begin: list[float] = []
            self.end: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            self.begin.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            self.end.append(time.perf_counter())

        def seconds_per_step(self) -> list[float]:
            """Wall seconds per step, end to end (so data loading between steps counts); the first from its begin."""
            return [self.end[0] - self.begin[0]] + [b - a for a, b in zip(self.end, self.end[1:])]

        def compute_seconds(self) -> list[float]:
            """Seconds from each step's begin to its end."""
            return [e - b for b, e in zip(self.begin, self.end)]

    return StepTimer()


def train_trl(spec: dict, model, ref_model, *, peft_config=None, **config) -> dict:
    """Train `model` with TRL's DPOTrainer on the spec's data (rows in dpokit's visiting order, a sequential
    sampler, no saving) with `config` as further DPOConfig fields; return per-step seconds and tokens, losses,
    the trainable parameter count, the reference precompute time and the memory marks."""
    import datasets
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    datasets.disable_progress_bars()
    rows = [json.loads(line) for line in Path(spec["data_trl"]).read_text().splitlines()]
    dataset = datasets.Dataset.from_list(rows)
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    timer = step_timer()
    tokens: list[int] = []
    marks: dict = {}

    class Trainer(DPOTrainer):
        def training_step(self, model, inputs, *a, **k):
            tokens.append(int(inputs["attention_mask"].sum()))
            return super().training_step(model, inputs, *a, **k)

        def _precompute_ref_logps(self, *a, **k):
            t = time.perf_counter()
            out = super()._precompute_ref_logps(*a, **k)
            marks["precompute_seconds"] = marks.get("precompute_seconds", 0.0) + time.perf_counter() - t
            return out

    args = DPOConfig(
        output_dir=spec["output"], per_device_train_batch_size=spec["batch_size"], gradient_accumulation_steps=1,
        max_length=spec["max_length"], max_steps=spec["steps"], lr_scheduler_type="constant", warmup_steps=0,
        optim="adamw_torch", bf16=False, fp16=False, use_cpu=True, report_to=[], logging_steps=1,
        save_strategy="no", dataloader_num_workers=0, dataloader_pin_memory=False, disable_tqdm=True,
        seed=spec["seed"], train_sampling_strategy="sequential", beta=0.1, **config,
    )
    trainer = Trainer(model=model, ref_model=ref_model, args=args, train_dataset=dataset, processing_class=tokenizer,
                      callbacks=[timer], peft_config=peft_config)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    rss_before = rss_mib()
    hwm_reset = reset_hwm()
    trainer.train()
    steps = len(timer.end)
    return {
        "seconds_per_step": timer.seconds_per_step(),
        "seconds_per_step_compute_only": timer.compute_seconds(),
        "tokens_per_step": tokens[:steps],
        "loss": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "trainable_params": trainable,
        "precompute_seconds": marks.get("precompute_seconds"),
        "rss_before_train_mib": rss_before,
        "peak_rss_mib": peak_rss_mib(),
        "train_peak_rss_mib": proc_status("VmHWM") if hwm_reset else None,
    }


def load_hf_model(spec: dict, **options):
    """The spec's model, as transformers loads it, in float32 unless `options` say otherwise."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(spec["model_dir"], **{"dtype": torch.float32, **options})


def child_trl(spec: dict) -> dict:
    start = start_child(spec["threads"], *TRL_IMPORTS)
    precompute = spec["options"]["precompute_ref_log_probs"]
    model = load_hf_model(spec)
    ref_model = None if precompute else load_hf_model(spec)
    result = train_trl(spec, model, ref_model, learning_rate=1e-6, gradient_checkpointing=False,
                       precompute_ref_log_probs=precompute)
    return {**result, **start}


CHILDREN = {"dpokit": child_dpokit, "trl": child_trl}
