"""The TRL side of bench/bench_e2e.py: a DPO training script as a TRL user writes it, whose whole process the
benchmark times beside ``dpokit dpo``. Its options are named as dpokit's, so that one list of options serves both:

    python bench/_e2e_trl.py --model M --data pairs.jsonl --output OUT --batch-size 8 --max-length 512 \\
        --max-steps 10 --lr 1e-6 --threads 2 --seed 0 --max-grad-norm 1.0 [--dtype bfloat16] [--precompute-ref] \\
        [--lora-r 16 ...]

``DPOTrainer`` on the JSONL rows in their order (a sequential sampler: the benchmark writes them in the order
dpokit's first epoch visits its data, so both train on the same batches), float32 (``bf16=False``: TRL's default
would autocast to bfloat16 on CPU too; ``--dtype bfloat16``: ``bf16=True``, autocast over the float32 model and
reference), without gradient checkpointing (TRL's default; dpokit's is off), AdamW (``adamw_torch``), constant
learning rate without warm-up, beta 0.1, a loss logged every step, no checkpoint during the run and the trained
model saved at its end (as ``dpokit dpo`` saves OUTPUT/final). With
``--precompute-ref``: ``precompute_ref_log_probs=True`` and no reference model; with ``--lora-r``: a peft
``LoraConfig`` on every linear layer and no reference model (TRL disables the adapter for it). ``--step-log FILE``
writes the seconds of every optimizer step as the in-process harness times them (bench/_children.py).
``--trl-defaults`` leaves bf16, gradient checkpointing and the optimizer at what ``DPOConfig()`` gives (TRL as it
ships: bfloat16 autocast, on CPU too; gradient checkpointing; fused AdamW).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    for name in ("--model", "--data", "--output"):
        add(name, required=True)
    add("--batch-size", type=int, default=8)
    add("--max-length", type=int, default=512)
    add("--max-steps", type=int, required=True)
    add("--lr", type=float, default=1e-6)
    add("--threads", type=int, required=True)
    add("--seed", type=int, default=0)
    add("--dtype", choices=("float32", "bfloat16"), default="float32", help="bfloat16: bf16=True (autocast)")
    add("--max-grad-norm", type=float, default=1.0)
    add("--precompute-ref", action="store_true")
    add("--lora-r", type=int, default=0)
    add("--lora-alpha", type=float, default=None)
    add("--lora-dropout", type=float, default=0.0)
    add("--trl-defaults", action="store_true",
        help="leave bf16, gradient checkpointing and the optimizer at TRL's defaults (bf16 autocast, on, fused AdamW)")
    add("--step-log", help="write the per-step seconds (whole loop iteration and compute only) here as JSON")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    ref_model = peft_config = None
    if args.lora_r:
        from peft import LoraConfig

        peft_config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha or 2 * args.lora_r,
                                 lora_dropout=args.lora_dropout, target_modules="all-linear", task_type="CAUSAL_LM")
    elif not args.precompute_ref:
        ref_model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    # what dpokit's run does; with --trl-defaults these stay at TRL's defaults (bf16 autocast, gradient
    # checkpointing, fused AdamW)
    matched = {} if args.trl_defaults else dict(bf16=args.dtype == "bfloat16", fp16=False,
                                                gradient_checkpointing=False, optim="adamw_torch")
    config = DPOConfig(
        output_dir=args.output, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        max_length=args.max_length, max_steps=args.max_steps, learning_rate=args.lr, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=args.max_grad_norm, beta=0.1, use_cpu=True,
        precompute_ref_log_probs=args.precompute_ref, seed=args.seed, train_sampling_strategy="sequential",
        logging_steps=1, save_strategy="no", report_to="none", dataloader_num_workers=0,
        dataloader_pin_memory=False, disable_tqdm=True, **matched,
    )
    callbacks = []
    if args.step_log:
        from _children import step_timer

        callbacks.append(step_timer())
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=config, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)
    trainer.train()
    trainer.save_model(str(Path(args.output) / "final"))
    if args.step_log:
        timer = callbacks[0]
        Path(args.step_log).write_text(json.dumps({"seconds_per_step": timer.seconds_per_step(),
                                                   "seconds_per_step_compute_only": timer.compute_seconds()}))


if __name__ == "__main__":
    main()
