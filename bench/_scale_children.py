"""The child processes of bench_scale.py: one DPO training run each (dpokit or TRL; full, LoRA or QLoRA).

Every child trains the same model on the same batches with AdamW (constant learning rate, no warm-up) in
float32 and reports its per-step seconds, token counts, trainable parameter count and peak RSS.
"""

from __future__ import annotations

from _children import TRL_IMPORTS, load_hf_model, train_dpokit, train_trl
from _setup import start_child

LR = 1e-5
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
LORA_FIELDS = {"lora_r": LORA["r"], "lora_alpha": LORA["alpha"], "lora_dropout": LORA["dropout"]}  # TrainConfig's

# name -> (library, options). dpokit options are TrainConfig fields; TRL options are interpreted by child_trl.
SYSTEMS = {
    "dpokit-full": ("dpokit", {}),
    "dpokit-lora": ("dpokit", dict(LORA_FIELDS)),
    "dpokit-qlora": ("dpokit", dict(LORA_FIELDS, load_in_4bit=True)),
    # not in the default set: LoRA with gradient checkpointing (activations recomputed in the backward pass)
    "dpokit-lora-gc": ("dpokit", dict(LORA_FIELDS, gradient_checkpointing=True)),
    # not in the default set: dpokit's return_freed_memory (glibc serves blocks >= 128 KiB by mmap; dpokit.runtime.memory)
    "dpokit-full-mmap": ("dpokit", {"return_freed_memory": True}),
    # not in the default set: full fine-tuning with gradient checkpointing, the like-for-like base for dpokit-lora-gc
    "dpokit-full-gc": ("dpokit", {"gradient_checkpointing": True}),
    "dpokit-lora-mmap": ("dpokit", dict(LORA_FIELDS, return_freed_memory=True)),
    "trl-full": ("trl", {"peft": False, "load_in_4bit": False}),
    "trl-lora": ("trl", {"peft": True, "load_in_4bit": False}),
    "trl-qlora": ("trl", {"peft": True, "load_in_4bit": True}),
    # not in the default set: TRL's own default, gradient checkpointing on (DPOConfig's default in TRL 1.16)
    "trl-lora-gc": ("trl", {"peft": True, "load_in_4bit": False, "gradient_checkpointing": True}),
}
DEFAULT_SYSTEMS = ["dpokit-full", "dpokit-lora", "dpokit-qlora", "trl-full", "trl-lora", "trl-qlora"]


def dpokit_lora_fields() -> list[str]:
    """The LoRA/quantisation fields the installed dpokit.TrainConfig has (empty before LoRA support exists)."""
    import dataclasses

    from dpokit.config import TrainConfig

    wanted = {"lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "load_in_4bit", "load_in_8bit",
              "gradient_checkpointing", "return_freed_memory"}
    return sorted(f.name for f in dataclasses.fields(TrainConfig) if f.name in wanted)


def _count_adamw(counter: dict):
    """Replace torch.optim.AdamW by a subclass that records how many parameters it updates."""
    import torch

    real = torch.optim.AdamW

    class CountingAdamW(real):
        def __init__(self, params, *a, **k):
            params = list(params)
            flat = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
            counter["trainable_params"] = counter.get("trainable_params", 0) + sum(p.numel() for p in flat)
            super().__init__(params, *a, **k)

    torch.optim.AdamW = CountingAdamW


def child_dpokit(spec: dict) -> dict:
    start = start_child(spec["threads"], "dpokit.api")
    marks: dict = {}
    _count_adamw(marks)
    result = train_dpokit(spec, marks, lr=LR, schedule="constant", beta=0.1, **spec["options"])
    return {**result, "trainable_params": marks.get("trainable_params"), **start}


def child_trl(spec: dict) -> dict:
    start = start_child(spec["threads"], *TRL_IMPORTS, "transformers:BitsAndBytesConfig")
    import torch
    from transformers import BitsAndBytesConfig

    opts = spec["options"]
    load = {}
    if opts["load_in_4bit"]:
        load["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                         bnb_4bit_compute_dtype=torch.float32)
    model = load_hf_model(spec, **load)
    ref_model = peft_config = None
    if opts["peft"]:
        import peft

        peft_config = peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                      target_modules="all-linear", task_type="CAUSAL_LM")
    else:
        ref_model = load_hf_model(spec)
    result = train_trl(spec, model, ref_model, peft_config=peft_config, learning_rate=LR, max_grad_norm=10.0,
                       gradient_checkpointing=opts.get("gradient_checkpointing", False),
                       precompute_ref_log_probs=False)
    return {**result, **start}


CHILDREN = {"dpokit": child_dpokit, "trl": child_trl}
