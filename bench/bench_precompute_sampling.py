#!/usr/bin/env python
"""Reference-log-prob precompute and sampling speed, as tokens/s: dpokit against TRL and plain `generate`.

    python bench/bench_precompute_sampling.py            # default shape (bench_vs_trl.py's), 3 rounds
    python bench/bench_precompute_sampling.py --quick    # tiny shape, 1 round: checks the harness works

On the same locally built model and preference data as ``bench_vs_trl.py`` (``_setup.py``):

* **precompute**: the reference log-probs of every pair, by dpokit (``dpokit.train.reference.compute_reference_logps``:
  no_grad, longest examples first, packed layout, chunked response-only logits) and by TRL's ``DPOTrainer``
  with ``precompute_ref_log_probs=True`` (its ``_precompute_ref_logps``, timed around the call, on a trainer
  built afresh every round; building it, and its tokenisation, are not timed). Both use ``--batch-size`` pairs
  per batch. Tokens = prompt + response tokens of every sequence, the prompt counted once per response: the
  non-padding tokens of TRL's batches (counted from its attention masks, and checked equal to dpokit's count).
* **sampling**: ``--prompts`` prompts of the data, ``--max-new-tokens`` new tokens each, temperature 1 without
  top-k (exact samples), by dpokit's sampler (``dpokit.eval.generation.sample_ids``: prompts sorted by length, KV
  cache, ``--batch-size`` sequences per ``generate`` call), by plain ``model.generate`` in the same batches of
  prompts in their data order (left-padded, KV cache), and one prompt at a time. Tokens = the new tokens kept
  (through the first EOS; the random model rarely emits it, so nearly all ``--max-new-tokens``).

Every round runs every system once, in the order listed, reversed on odd rounds (so a drift of the machine's
load does not favour one side); one warm-up round is run first and discarded. Values are medians over rounds
with (min–max); ratios are per round, then summarised the same way. The machine's load average is printed and
stored: on a shared machine read the ratios, not the absolute rates.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from _harness import (alternating, apply_quick, fmt_summary, harness_parser, interleave, markdown, round_tag, summary,
                      write_result)
from _setup import add_shape_options, build_inputs, quiet_environment, workdir


def _args():
    parser = harness_parser(__doc__, rounds=3, rounds_help="measured rounds (default 3; one warm-up round more)",
                            batch_size=8, max_length=512, threads=1, child=None,
                            threads_help="torch threads for every system (default 1: on a busy machine 2 threads of "
                                         "a small model wait on each other at every op, 10-45x slower)",
                            quick="1 round of a tiny shape (hidden 64, 2 layers)")
    parser.add_argument("--pairs", type=int, default=64, help="preference pairs to precompute (default 64)")
    parser.add_argument("--prompts", type=int, default=16, help="prompts to sample from (default 16)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    add_shape_options(parser)
    parser.add_argument("--only", choices=("precompute", "sampling"), help="measure only these systems")
    args = parser.parse_args()
    apply_quick(args, rounds=1, pairs=16, prompts=8, max_new_tokens=8, prompt_len=40, response_len=24, hidden=64,
                layers=2, heads=2, max_length=128, vocab=2048)
    return args


# --------------------------------------------------------------------------------------------------------------
# the systems: each returns (seconds, tokens)


def dpokit_precompute(setup: dict, examples, tokenizer, args) -> tuple[float, int]:
    from dpokit.models.loading import load_model
    from dpokit.train.reference import ModelReference, compute_reference_logps

    reference = ModelReference(load_model(setup["model_dir"]))  # as train_dpo scores it: packed, chunked logits
    start = time.perf_counter()
    compute_reference_logps(reference, examples, batch_size=args.batch_size, layout="packed",
                            pad_token_id=tokenizer.pad_token_id)
    seconds = time.perf_counter() - start
    return seconds, sum(len(e.prompt_ids) + len(r) for e in examples for r in e.responses)


def trl_precompute(setup: dict, examples, tokenizer, args) -> tuple[float, int]:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    marks = {"seconds": 0.0, "tokens": 0}

    class Trainer(DPOTrainer):
        def _precompute_ref_logps(self, *a, **k):
            start = time.perf_counter()
            out = super()._precompute_ref_logps(*a, **k)
            marks["seconds"] += time.perf_counter() - start
            return out

        def compute_ref_log_probs(self, model, inputs):
            marks["tokens"] += int(inputs["attention_mask"].sum())
            return super().compute_ref_log_probs(model, inputs)

    rows = [json.loads(line) for line in Path(setup["data"]).read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(setup["model_dir"], dtype=torch.float32)
    config = DPOConfig(
        output_dir=str(Path(setup["model_dir"]).parent / "trl"), per_device_train_batch_size=args.batch_size,
        max_length=args.max_length, bf16=False, fp16=False, use_cpu=True, report_to=[], save_strategy="no",
        dataloader_num_workers=0, dataloader_pin_memory=False, disable_tqdm=True, seed=args.seed, beta=0.1,
        gradient_checkpointing=False, precompute_ref_log_probs=True,
    )
    Trainer(model=model, ref_model=None, args=config, train_dataset=datasets.Dataset.from_list(rows),
            processing_class=tokenizer)  # the precompute runs in the constructor
    return marks["seconds"], marks["tokens"]


def _new_tokens(row: list[int], eos: int) -> int:
    """New tokens kept: through the first EOS (after it, a finished sequence only holds padding)."""
    return row.index(eos) + 1 if eos in row else len(row)


def dpokit_sampling(model, tokenizer, prompts: list[str], args) -> tuple[float, int]:
    from dpokit.eval.generation import sample_ids

    start = time.perf_counter()
    samples = sample_ids(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, temperature=1.0, seed=args.seed,
                         batch_size=args.batch_size, chat_template=False, progress=False)
    return time.perf_counter() - start, sum(len(s.ids) for group in samples for s in group)


def hf_sampling(model, tokenizer, prompts: list[str], args, batch_size: int) -> tuple[float, int]:
    """Plain `model.generate`, prompts in their data order, `batch_size` at a time (left-padded), KV cache."""
    import torch

    eos, tokens = tokenizer.eos_token_id, 0
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    with torch.no_grad():
        for k in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[k : k + batch_size], return_tensors="pt", padding=True, padding_side="left")
            out = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, max_new_tokens=args.max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
            tokens += sum(_new_tokens(row, eos) for row in out[:, enc["input_ids"].shape[1]:].tolist())
    return time.perf_counter() - start, tokens


# --------------------------------------------------------------------------------------------------------------


def systems(args, setup: dict, work: Path) -> dict:
    """name -> a function that runs it once and returns (seconds, tokens)."""
    from dpokit.api import prepare_data
    from dpokit.config import TrainConfig
    from dpokit.models.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(setup["model_dir"])
    config = TrainConfig(model=setup["model_dir"], data=setup["data"], output=str(work / "probe"),
                         max_length=args.max_length, max_prompt_length=setup["max_prompt_length"])
    examples = prepare_data(config, "dpo", tokenizer, log=lambda *_: None, use_cache=False).train
    model = load_model(setup["model_dir"])
    prompts = [json.loads(line)["prompt"] for line in Path(setup["data"]).read_text().splitlines()][: args.prompts]
    found = {
        "dpokit precompute": lambda: dpokit_precompute(setup, examples, tokenizer, args),
        "TRL precompute": lambda: trl_precompute(setup, examples, tokenizer, args),
        "dpokit sampling": lambda: dpokit_sampling(model, tokenizer, prompts, args),
        "generate, batched": lambda: hf_sampling(model, tokenizer, prompts, args, args.batch_size),
        "generate, one prompt at a time": lambda: hf_sampling(model, tokenizer, prompts, args, 1),
    }
    if args.only:
        found = {name: run for name, run in found.items() if ("precompute" in name) == (args.only == "precompute")}
    return found


def measure(args, work: Path) -> tuple[dict, dict]:
    """Build the inputs and run every system once per round, after a warm-up round; return the setup and runs."""
    import torch

    setup = build_inputs(args, work)
    runs = systems(args, setup, work)

    def run(name, round_):
        seconds, tokens = runs[name]()
        if torch.get_num_threads() != args.threads:
            raise SystemExit(f"{name} changed the thread count to {torch.get_num_threads()}")
        return {"seconds": seconds, "tokens": tokens, "tokens_per_second": tokens / seconds}

    def report(name, round_, r):
        print(f"{round_tag(round_, args.rounds):12s} {name:32s} {r['seconds']:7.2f} s  {r['tokens']:6d} tokens  "
              f"{r['tokens_per_second']:8.0f} tokens/s", flush=True)

    return setup, interleave(args.rounds, alternating(list(runs)), run, report, warmup_rounds=1)


def summarise(raw: dict) -> tuple[dict, list, str]:
    """Per-round ratios, whether both precomputes scored the same tokens, and the table."""
    rates = {name: [r["tokens_per_second"] for r in runs] for name, runs in raw.items()}
    pairs = {"precompute: dpokit / TRL": ("dpokit precompute", "TRL precompute"),
             "sampling: dpokit / generate, batched": ("dpokit sampling", "generate, batched"),
             "sampling: dpokit / generate, one at a time": ("dpokit sampling", "generate, one prompt at a time")}
    ratios = {label: summary([a / b for a, b in zip(rates[x], rates[y])]) for label, (x, y) in pairs.items()
              if x in rates and y in rates}
    same_tokens = [a["tokens"] == b["tokens"]
                   for a, b in zip(raw.get("dpokit precompute", []), raw.get("TRL precompute", []))]
    text = "\n".join([
        markdown(["system", "seconds", "tokens", "tokens/s"],
                 [[name, fmt_summary(summary([r["seconds"] for r in runs]), 2), runs[0]["tokens"],
                   fmt_summary(summary(rates[name]), 0)] for name, runs in raw.items()]),
        "", markdown(["ratio (tokens/s)", "median (min–max)"], [[label, fmt_summary(s, 2)] for label, s in ratios.items()])])
    return ratios, same_tokens, text


def main() -> None:
    args = _args()
    os.environ.update(quiet_environment(threads=args.threads))
    import torch

    torch.set_num_threads(args.threads)
    import datasets

    datasets.disable_progress_bars()
    datasets.disable_caching()  # TRL must compute its table every round, never reuse a cached one
    load = [os.getloadavg()]
    print(f"load average {load[0][0]:.1f}", flush=True)
    with workdir(args, "dpokit_bench_ps_") as work:
        setup, raw = measure(args, work)
    load.append(os.getloadavg())
    ratios, same_tokens, text = summarise(raw)
    m, stats = setup["model"], setup["data_stats"]
    print(f"\n{args.pairs} pairs (prompt {stats['prompt_tokens']}, responses {stats['response_tokens_incl_eos']} "
          f"tokens), {args.prompts} prompts x {args.max_new_tokens} new tokens, batch {args.batch_size}; model "
          f"{m['params_total'] / 1e6:.2f}M params (hidden {m['hidden']}, {m['layers']} layers, vocab {m['vocab']}); "
          f"float32, {args.threads} threads; {args.rounds} rounds; load average {load[0][0]:.1f} before, "
          f"{load[1][0]:.1f} after" + (f"; precompute tokens equal (dpokit vs TRL): {all(same_tokens)}"
                                       if same_tokens else ""))
    print("values: median (min–max over rounds)")
    print(text)
    path = write_result(args, "precompute-sampling-", {
        "setup": setup, "raw": raw, "ratios": ratios, "same_precompute_tokens": same_tokens, "load_average": load,
        "versions": {mod: __import__(mod).__version__ for mod in ("torch", "transformers", "trl")},
        "table_markdown": text})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
