#!/usr/bin/env python
"""Speed and memory of dpokit's DPO step against TRL's DPOTrainer on a tiny vision-language model (docs/vision.md).

    python bench/bench_vlm.py                 # 576 image tokens per image, 3 interleaved rounds
    python bench/bench_vlm.py --quick         # a smoke run of the harness (64 image tokens, 1 round, 3 steps)

What it does:

1. Builds, in a work directory, a LLaVA-style model (random init: a CLIP vision tower on --image-size pixels in
   16-pixel patches, so (image-size/16)^2 image tokens per image, 576 at the default 384; a Llama language model
   of --hidden width and --layers layers) with its processor (a word-level tokenizer, a Llama-3-style chat
   template), and --pairs preference pairs of one noisy image each, question "what colour is the square?", a
   right and a wrong answer. dpokit reads them as JSONL with image paths; TRL as a ``datasets.Dataset`` of the
   same rows with PIL images.
2. Runs dpokit (``dpokit.api.train_dpo``: its default layout, packed, so the image prompt runs once per pair;
   the vision tower frozen, float32, AdamW) and TRL
   (``DPOTrainer.train()`` with the processor, float32, AdamW, the vision tower frozen the same way, sequential
   sampler) in a child process each, in interleaved rounds whose order alternates, with the same batch size,
   steps, learning rate and threads; seconds per step (the first --warmup steps discarded) and peak RSS per run.
   The rows are the same for both; their order differs (dpokit shuffles with --seed), which changes no shape:
   every prompt holds one image of the same size and responses differ by one word.
3. Prints a markdown table and writes bench/results/vlm-<timestamp>.json.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from vision_dpo import COLOURS, build_model  # noqa: E402  (the example's tiny LLaVA, in a benchmark shape)
from _children import step_timer, train_dpokit
from _harness import (alternating, apply_quick, chosen_systems, harness_parser, interleave, markdown, median,
                      run_line, spread, step_rates, write_result)
from _setup import child_environment, peak_rss_mib, proc_status, reset_hwm, rss_mib, run_child, serve_child, \
    start_child, workdir

SYSTEMS = {"dpokit": "dpokit", "trl": "trl"}


def parse_args():
    parser = harness_parser(__doc__, rounds=3, steps=8, warmup=2, batch_size=4, max_length=None, threads=2,
                            systems=SYSTEMS, quick="smoke run: 128-pixel images (64 image tokens), hidden 64, "
                                                   "1 round, 3 steps")
    parser.add_argument("--image-size", type=int, default=384, help="image side in pixels, a multiple of 16 "
                        "(default 384: 576 image tokens)")
    parser.add_argument("--hidden", type=int, default=256, help="language model width (default 256)")
    parser.add_argument("--layers", type=int, default=4, help="language model layers (default 4)")
    parser.add_argument("--pairs", type=int, default=32, help="preference pairs (default 32)")
    args = parser.parse_args()
    apply_quick(args, rounds=1, steps=3, warmup=1, image_size=128, hidden=64, layers=2, pairs=8)
    args.names = chosen_systems(parser, args, SYSTEMS)
    return args


def build(args, work: Path) -> dict:
    """The model directory and the data (see the module docstring)."""
    from PIL import Image

    tokens = (args.image_size // 16) ** 2
    model_dir = work / "model"
    build_model(model_dir, args.seed, image_size=args.image_size, hidden=args.hidden, intermediate=4 * args.hidden,
                layers=args.layers, kv_heads=4, vision_hidden=32)
    rng, names, rows = random.Random(args.seed), list(COLOURS), []
    (work / "images").mkdir(exist_ok=True)
    for i in range(args.pairs):
        colour, wrong = names[i % 4], names[(i + 1 + rng.randrange(3)) % 4]
        noise = Image.effect_noise((args.image_size, args.image_size), 40).convert("RGB")
        image = Image.blend(Image.new("RGB", noise.size, COLOURS[colour]), noise, 0.3)
        image.save(work / "images" / f"{i}.png")
        rows.append({"images": [f"images/{i}.png"],
                     "prompt": [{"role": "user", "content": [{"type": "image"},
                                                             {"type": "text", "text": "what colour is the square?"}]}],
                     "chosen": [{"role": "assistant", "content": [{"type": "text", "text": f"it is {colour} ."}]}],
                     "rejected": [{"role": "assistant", "content": [{"type": "text", "text": f"it is {wrong} ."}]}]})
    (work / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"model_dir": str(model_dir), "data": str(work / "pairs.jsonl"), "image_tokens": tokens,
            "max_length": tokens + 48}


def child_dpokit(spec: dict) -> dict:
    start = start_child(spec["threads"], "dpokit.api", "dpokit.train.loop")
    return {**train_dpokit(spec, {}, lr=1e-6), **start}


def child_trl(spec: dict) -> dict:
    start = start_child(spec["threads"], "trl", "transformers")
    import datasets
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText
    from trl import DPOConfig, DPOTrainer

    from dpokit.models.vision import freeze_vision_tower, load_processor

    datasets.disable_progress_bars()
    base = Path(spec["data"]).parent
    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()]
    rows = [{**r, "images": [Image.open(base / p).convert("RGB") for p in r["images"]]} for r in rows]
    load = lambda: AutoModelForImageTextToText.from_pretrained(spec["model_dir"], dtype=torch.float32)  # noqa: E731
    model, reference = load(), load().eval()
    freeze_vision_tower(model)  # as dpokit does by default
    timer, tokens = step_timer(), []

    class Trainer(DPOTrainer):  # the non-padding tokens of each step, as dpokit counts them
        def training_step(self, model, inputs, *a, **k):
            tokens.append(int(inputs["attention_mask"].sum()))
            return super().training_step(model, inputs, *a, **k)

    args = DPOConfig(output_dir=spec["output"], per_device_train_batch_size=spec["batch_size"],
                     gradient_accumulation_steps=1, max_length=None, max_steps=spec["steps"], learning_rate=1e-6,
                     lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch", bf16=False, fp16=False,
                     use_cpu=True, report_to=[], logging_steps=1, save_strategy="no", dataloader_num_workers=0,
                     dataloader_pin_memory=False, disable_tqdm=True, seed=spec["seed"],
                     train_sampling_strategy="sequential", beta=0.1)
    trainer = Trainer(model=model, ref_model=reference, args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=load_processor(spec["model_dir"]), callbacks=[timer])
    rss_before, hwm_reset = rss_mib(), reset_hwm()
    trainer.train()
    return {"seconds_per_step": timer.seconds_per_step(), "tokens_per_step": tokens[:len(timer.end)],
            "loss": [h["loss"] for h in trainer.state.log_history if "loss" in h], "rss_before_train_mib": rss_before,
            "peak_rss_mib": peak_rss_mib(), "train_peak_rss_mib": proc_status("VmHWM") if hwm_reset else None,
            **start}


CHILDREN = {"dpokit": child_dpokit, "trl": child_trl}


def main() -> None:
    import sys

    if "--child" in sys.argv:
        serve_child(sys.argv[sys.argv.index("--child") + 1], CHILDREN)
        return
    args = parse_args()
    started = time.perf_counter()
    with workdir(args, "dpokit-bench-vlm-") as work:
        built = build(args, work)
        print(f"tiny LLaVA: {built['image_tokens']} image tokens per image, hidden {args.hidden}, {args.layers} "
              f"layers; {args.pairs} pairs, batch {args.batch_size}, {args.steps} steps", flush=True)
        spec = {"model_dir": built["model_dir"], "data": built["data"], "batch_size": args.batch_size,
                "max_length": built["max_length"], "max_prompt_length": built["max_length"] - 16,
                "steps": args.steps, "threads": args.threads, "seed": args.seed}

        def run(name: str, round_: int) -> dict:
            return run_child(__file__, dict(spec, kind=name), work, f"{name}_{round_}",
                             child_environment(name, "as-shipped", args.threads, work), failed="record")

        report = lambda name, round_, result: print(run_line(round_, args.rounds, name, result, args.warmup),  # noqa
                                                    flush=True)
        runs = interleave(args.rounds, alternating(args.names), run, report)
    rows, summary = [], {}
    for name, results in runs.items():
        ok = [r for r in results if not r.get("failed")]
        seconds = [step_rates(r, args.warmup)[0] for r in ok]
        peaks = [r["peak_rss_mib"] for r in ok]
        summary[name] = {"seconds_per_step": seconds, "peak_rss_mib": peaks, "failed": len(results) - len(ok)}
        rows.append([name, spread(seconds), spread(peaks, "{:.0f}"), len(results) - len(ok)])
    if {"dpokit", "trl"} <= set(summary) and summary["dpokit"]["seconds_per_step"]:
        ratio = median(summary["trl"]["seconds_per_step"]) / median(summary["dpokit"]["seconds_per_step"])
        print(f"TRL / dpokit seconds per step: {ratio:.2f}")
    print(markdown(["system", "s/step median (min-max)", "peak RSS MiB", "failed runs"], rows))
    path = write_result(args, "vlm-", {"built": built, "runs": runs, "summary": summary}, started)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
