#!/usr/bin/env python
"""One-GPU smoke test of dpokit's engines and adapters at ~1B parameters, with TRL on the same work.

Run through bench/gpu_check.sh (see bench/README.md, "GPU smoke test"):

    bash bench/gpu_check.sh              # one CUDA GPU, bf16, ~1B-parameter Llama, a few steps per run
                                         # (sized for < 8 min on an H100/H200; not yet run on a GPU)
    bash bench/gpu_check.sh --dry-run    # the same sequence on CPU: tiny model, float32, 2 steps (< 3 min)

Nothing is downloaded: a byte-level BPE tokenizer is trained locally and a ``LlamaForCausalLM`` is built with
random weights (bench/_setup.py), with synthetic preference data. Then, each in its own process:

==============  =====================================================================================
exactness       log-probs (and on CUDA gradients) of the packed layout with FlexAttention block masks against
                the plain layout with SDPA, float32, TF32 off: relative 1e-5 (gradients 1e-4), or the check fails;
                then the same weights as a Mistral with a sliding window shorter than most pairs
dpokit-full     ``dpokit.api.train_dpo``, one process, full fine-tuning, reference resident (``--attention
                auto``: FlexAttention block masks on CUDA)
dpokit-dense    the same with ``--attention sdpa`` (the dense 4-D mask): the fast path's gain (GPU only)
dpokit-fsdp2    the same under ``accelerate launch --config_file configs/accelerate/fsdp2.yaml``
dpokit-zero3    the same under ``accelerate launch --config_file configs/accelerate/zero3.yaml``
dpokit-lora     LoRA r=16, alpha=32, dropout 0 on every decoder linear layer (reference: adapter disabled)
dpokit-qlora    the same on a 4-bit NF4 base (``load_in_4bit``)
trl-full        ``trl.DPOTrainer`` with a reference model
trl-lora        ``trl.DPOTrainer`` with the same LoRA config (``peft_config``), no reference model
==============  =====================================================================================

All train with AdamW (lr 1e-5, constant) on the same batches; on the GPU in bf16 mixed precision (dpokit
``dtype=bfloat16``, TRL ``bf16=True``; reference weights in bf16 for both), with one process. Reported per run:
the engine dpokit says it used (its "training N steps (<engine>)" line; for the FSDP2/ZeRO-3 runs it must be
fsdp2/zero3, else the run fails), seconds per step (dpokit: ``seconds_per_step`` from OUTPUT/metrics.jsonl;
TRL: time between ``on_step_end`` callbacks; median over the steps after the first), peak CUDA memory
(``torch.cuda.max_memory_allocated`` after training; on CPU peak RSS instead), first and last loss.

``--dry-run`` (CPU, what CI runs): hidden 64, 2 layers, float32, 2 steps. accelerate enables FSDP and DeepSpeed
only for multi-process launches on a CPU (``--cpu`` selects its single-process launcher, i.e. no engine at
all), so there the FSDP2 and ZeRO-3 runs use 2 CPU processes with gloo (``DS_ACCELERATOR=cpu`` for DeepSpeed,
whose JIT-compiled shared-memory all-reduce kernel is replaced by torch.distributed's gloo to avoid a 1-2 minute
C++ build); the engine check still applies. Any failed run makes the exit status non-zero.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LORA = {"lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0}

# name, library, accelerate config (None: a plain process), options, engine dpokit must report
RUNS = [
    ("dpokit-full", "dpokit", None, {}, "single"),  # --attention auto: FlexAttention block masks on CUDA
    ("dpokit-dense", "dpokit", None, {"attention": "sdpa"}, "single"),  # the dense 4-D mask in SDPA, to compare
    ("dpokit-fsdp2", "dpokit", "fsdp2", {}, "fsdp2"),
    ("dpokit-zero3", "dpokit", "zero3", {}, "zero3"),
    ("dpokit-lora", "dpokit", None, dict(LORA), "single"),
    ("dpokit-qlora", "dpokit", None, dict(LORA, load_in_4bit=True), "single"),
    ("trl-full", "trl", None, {"peft": False}, None),
    ("trl-lora", "trl", None, {"peft": True}, None),
]

SHAPES = {  # model and data per mode
    "gpu": dict(hidden=2048, layers=16, heads=16, intermediate=5632, vocab=32000, batch_size=4, steps=6,
                prompt_len=128, response_len=96, max_length=512, timeout=300),
    "dry": dict(hidden=64, layers=2, heads=2, intermediate=128, vocab=1024, batch_size=2, steps=2,
                prompt_len=24, response_len=12, max_length=96, timeout=150),
}


GPU_ONLY = {"dpokit-dense"}  # on a CPU `auto` is SDPA already: the run would repeat dpokit-full


# --------------------------------------------------------------------------------------------------------------
# children


def _peak_cuda() -> int | None:
    import torch

    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def _is_main() -> bool:
    return os.environ.get("RANK", "0") == "0"


def child_dpokit(spec: dict) -> dict:
    import torch

    from dpokit.api import train_dpo
    from dpokit.config import TrainConfig
    from dpokit.train.metrics import read_metrics

    if spec.get("no_deepspeed_shm_op"):
        # DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce kernel (C++, 1-2 min on 2 cores, and
        # rebuilt whenever another Python environment shares ~/.cache/torch_extensions); without it DeepSpeed
        # uses torch.distributed (gloo). The dry run checks dpokit under ZeRO-3, not that kernel.
        import importlib

        # (the attribute deepspeed.comm.torch is the torch package, re-exported: patch the module itself)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    skipped = []
    if not spec["checkpoint"]:  # the end-of-run checkpoint (optimizer state included) is not what is timed
        import dpokit.api  # noqa: F401  (imports the trainer and whatever it saves with)

        for name, module in list(sys.modules.items()):
            if name.startswith("dpokit") and hasattr(module, "save_checkpoint"):
                module.save_checkpoint = lambda *a, **k: None
                skipped.append(name)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    config = TrainConfig(
        model=spec["model_dir"], data=spec["data"], output=spec["output"], batch_size=spec["batch_size"],
        max_length=spec["max_length"], max_prompt_length=spec["max_prompt_length"], max_steps=spec["steps"],
        optimizer="adamw", lr=1e-5, warmup_steps=0, schedule="constant", dtype=spec["dtype"], seed=0, beta=0.1,
        save_final=False, save_every=0, log_every=1, **spec["options"],
    )
    train_dpo(config)
    peak = _peak_cuda()
    result = {"peak_cuda_bytes": peak, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "checkpoint_skipped_in": skipped}
    if _is_main():
        rows = [r for r in read_metrics(Path(spec["output"]) / "metrics.jsonl") if r["split"] == "train"]
        result.update(seconds_per_step=[r["seconds_per_step"] for r in rows], loss=[r["loss"] for r in rows])
    return result


def child_exactness(spec: dict) -> dict:
    """Log-probs (and on CUDA the gradients) of the packed layout with FlexAttention block masks against the
    plain layout with SDPA, float32, TF32 off, on the first 8 pairs: the fast path must change no number. Then the
    same for the model's weights as a Mistral whose layers attend within ``spec["sliding_window"]`` tokens, shorter
    than most of these pairs: the block masks must apply the window."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from dpokit.data import load_preferences
    from dpokit.models.loading import load_model, load_tokenizer
    from dpokit.data.tokenize import TokenizeConfig, tokenize_examples

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    if not cuda:  # FlexAttention has no backward on CPU, and its compiled forward needs a C++ build: eager forward
        import transformers.integrations.flex_attention as hf_flex
        from torch.nn.attention.flex_attention import flex_attention

        hf_flex.WrappedFlexAttention.__call__ = lambda self: flex_attention
    tokenizer = load_tokenizer(spec["model_dir"])
    pairs = load_preferences(spec["data"])[0][:8]
    examples = tokenize_examples(pairs, tokenizer, TokenizeConfig(max_length=spec["max_length"],
                                                                  max_prompt_length=spec["max_prompt_length"]))[0]
    model = load_model(spec["model_dir"]).to(device)
    out = {"gradients_checked": cuda, "pairs": len(examples),
           **_flex_against_plain(model, examples, tokenizer.pad_token_id, device)}
    window = spec["sliding_window"]
    config = MistralConfig(**{k: v for k, v in model.config.to_dict().items() if k not in ("architectures",
                                                                                         "model_type")},
                           sliding_window=window)
    windowed = MistralForCausalLM(config).to(device)
    windowed.load_state_dict(model.state_dict())  # Llama and Mistral name their weights alike
    del model
    past = sum(len(e.prompt_ids) + max(len(r) for r in e.responses) > window for e in examples)
    out.update({f"window_{k}": v for k, v in _flex_against_plain(windowed, examples, tokenizer.pad_token_id,
                                                                  device).items()},
               sliding_window=window, pairs_past_window=past)
    return out


def _flex_against_plain(model, examples, pad_token_id: int, device: str) -> dict:
    import torch

    from dpokit.data.batching import collate
    from dpokit.models.logprobs import sequence_logprobs

    cuda = device == "cuda"
    ids = list(range(len(examples)))
    results = {}
    for name, layout, attention in (("plain-sdpa", "plain", "sdpa"), ("packed-flex", "packed", "flex_attention")):
        model.set_attn_implementation(attention)
        model.zero_grad(set_to_none=True)
        batch = collate(examples, ids, layout=layout, pad_token_id=pad_token_id).to(device)
        with torch.set_grad_enabled(cuda):
            logps = sequence_logprobs(model, batch)
            if cuda:
                logps.sum().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]) if cuda else None
        results[name] = (logps.detach().cpu(), grads)
    (plain, plain_grad), (flex, flex_grad) = results["plain-sdpa"], results["packed-flex"]
    out = {"logp_max_abs_diff": (flex - plain).abs().max().item(),
           "logp_max_rel_diff": ((flex - plain).abs() / plain.abs().clamp_min(1.0)).max().item()}
    if cuda:
        out["grad_max_rel_diff"] = ((flex_grad - plain_grad).abs().max() / plain_grad.abs().max()).item()
    return out


def child_trl(spec: dict) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from _children import step_timer

    datasets.disable_progress_bars()
    cuda = torch.cuda.is_available()
    bf16 = spec["dtype"] == "bfloat16"
    rows = [json.loads(line) for line in Path(spec["data_trl"]).read_text().splitlines()]
    dataset = datasets.Dataset.from_list(rows)
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    ref_model = peft_config = None
    if spec["options"]["peft"]:
        import peft

        peft_config = peft.LoraConfig(r=LORA["lora_r"], lora_alpha=LORA["lora_alpha"],
                                      lora_dropout=LORA["lora_dropout"], target_modules="all-linear",
                                      task_type="CAUSAL_LM")
    else:  # dpokit keeps its reference in the training dtype (ref_dtype defaults to dtype): the same here
        ref_model = AutoModelForCausalLM.from_pretrained(spec["model_dir"],
                                                         dtype=torch.bfloat16 if bf16 else torch.float32)

    timer = step_timer()
    config = DPOConfig(
        output_dir=spec["output"], per_device_train_batch_size=spec["batch_size"], gradient_accumulation_steps=1,
        max_length=spec["max_length"], max_steps=spec["steps"], learning_rate=1e-5, lr_scheduler_type="constant",
        warmup_steps=0, optim="adamw_torch", gradient_checkpointing=False, bf16=bf16, fp16=False, use_cpu=not cuda,
        report_to=[], logging_steps=1, save_strategy="no", dataloader_num_workers=0, disable_tqdm=True, seed=0,
        train_sampling_strategy="sequential", beta=0.1, max_grad_norm=10.0,
    )
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=config, train_dataset=dataset,
                         processing_class=tokenizer, callbacks=[timer], peft_config=peft_config)
    trainer.train()
    seconds = timer.seconds_per_step()
    return {"seconds_per_step": seconds, "loss": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "peak_cuda_bytes": _peak_cuda(),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# --------------------------------------------------------------------------------------------------------------
# parent


def build(mode: str, work: Path) -> dict:
    sys.path.insert(0, str(HERE))
    from _setup import build_everything

    s = SHAPES[mode]
    args = argparse.Namespace(seed=0, spread=0.3, pairs=s["batch_size"] * s["steps"] * 2,
                              **{k: s[k] for k in ("vocab", "hidden", "layers", "heads", "intermediate",
                                                   "max_length", "prompt_len", "response_len")})
    return build_everything(args, work)


def run(name: str, library: str, launcher: str | None, options: dict, mode: str, setup: dict, work: Path,
        processes: int, checkpoint: bool) -> dict:
    from _setup import free_port, quiet_environment  # on sys.path since build()

    s = SHAPES[mode]
    out = work / f"run_{name}"
    spec = {"library": library, "options": options, "model_dir": setup["model_dir"], "data": setup["data"],
            "data_trl": setup["data_trl"], "output": str(out), "batch_size": s["batch_size"], "steps": s["steps"],
            "max_length": s["max_length"], "max_prompt_length": setup["max_prompt_length"],
            "dtype": "bfloat16" if mode == "gpu" else "float32", "checkpoint": checkpoint,
            "result": str(work / f"result_{name}.json"),
            "no_deepspeed_shm_op": mode == "dry" and launcher is not None and launcher.startswith("zero")}
    spec_path = work / f"spec_{name}.json"
    spec_path.write_text(json.dumps(spec))
    env = quiet_environment(drop=("ACCELERATE_USE_CPU",), TOKENIZERS_PARALLELISM="false",
                            HF_DATASETS_CACHE=str(work / "hf_datasets_cache"))
    if launcher:
        if mode == "dry":
            env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs" / "accelerate" / f"{launcher}.yaml"), "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "bf16" if mode == "gpu" else "no",
               "--main_process_port", str(free_port()), __file__, "--child", str(spec_path)]
    else:
        cmd = [sys.executable, __file__, "--child", str(spec_path)]
    log = work / f"log_{name}.txt"
    started = time.perf_counter()
    status, error = "ok", None
    try:
        with log.open("w") as handle:
            proc = subprocess.run(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=work, timeout=s["timeout"])
        if proc.returncode != 0:
            status, error = "FAILED", f"exit code {proc.returncode}"
    except subprocess.TimeoutExpired:
        status, error = "FAILED", f"timed out after {s['timeout']} s"
    wall = time.perf_counter() - started
    text = log.read_text(errors="replace")
    result: dict = {"name": name, "command": " ".join(cmd), "wall_seconds": wall, "log": str(log)}
    if status == "ok":
        path = Path(spec["result"])
        if not path.exists():
            status, error = "FAILED", "no result written"
        else:
            result.update(json.loads(path.read_text()))
            if not result.get("seconds_per_step"):
                status, error = "FAILED", "no training steps recorded"
    if library == "dpokit":
        found = re.findall(r"training \d+ steps \(([\w-]+)\)", text)
        result["engine"] = found[-1] if found else None
        expected = next(r[4] for r in RUNS if r[0] == name)
        if status == "ok" and result["engine"] != expected:
            status, error = "FAILED", f"dpokit reported engine {result['engine']!r}, expected {expected!r}"
    else:
        result["engine"] = "trl"
    result.update(status=status, error=error)
    if status != "ok":
        result["log_tail"] = text[-5000:]
    shutil.rmtree(out, ignore_errors=True)
    return result


EXACT_LOGP, EXACT_GRAD = 1e-5, 1e-4  # relative: log-probs to 1e-5; gradients to 1e-4 of the largest entry


def run_exactness(mode: str, setup: dict, work: Path) -> dict:
    """child_exactness in its own process; its status is FAILED past the tolerances."""
    s = SHAPES[mode]
    spec = {"library": "exactness", "model_dir": setup["model_dir"], "data": setup["data"],
            "max_length": s["max_length"], "max_prompt_length": setup["max_prompt_length"],
            "sliding_window": s["prompt_len"],  # most prompt + response pairs are longer
            "result": str(work / "result_exactness.json")}
    spec_path = work / "spec_exactness.json"
    spec_path.write_text(json.dumps(spec))
    from _setup import quiet_environment

    env = quiet_environment(TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, __file__, "--child", str(spec_path)], env=env, capture_output=True,
                          text=True, cwd=work, timeout=s["timeout"])
    if proc.returncode != 0 or not Path(spec["result"]).exists():
        return {"status": "FAILED", "error": f"exit code {proc.returncode}", "log_tail": proc.stderr[-3000:]}
    result = json.loads(Path(spec["result"]).read_text())
    exact = all(result[f"{prefix}logp_max_rel_diff"] <= EXACT_LOGP
                and result.get(f"{prefix}grad_max_rel_diff", 0.0) <= EXACT_GRAD for prefix in ("", "window_"))
    exact = exact and result["pairs_past_window"] > 0  # else the window check would prove nothing
    result["status"] = "ok" if exact else "FAILED"
    return result


def print_exactness(exactness: dict) -> None:
    """The exactness stage's lines (its log's tail when it failed)."""
    for prefix, what in (("", ""), ("window_", f" as a Mistral with a {exactness.get('sliding_window')}-token window "
                                              f"({exactness.get('pairs_past_window')} of "
                                              f"{exactness.get('pairs')} pairs past it)")):
        grads = (f", gradients {exactness[prefix + 'grad_max_rel_diff']:.1e}"
                 if prefix + "grad_max_rel_diff" in exactness else " (forward only on CPU)")
        print(f"exactness     {exactness['status']:6s} packed+FlexAttention vs plain+SDPA{what}, float32: log-probs "
              f"{exactness.get(prefix + 'logp_max_rel_diff', float('nan')):.1e}{grads} (relative)", flush=True)
    if exactness["status"] != "ok":
        print(f"--- exactness:\n{exactness.get('log_tail', exactness)}\n---", flush=True)


def summary_table(results: list[dict], mode: str) -> str:
    """The markdown table of the runs."""
    from _harness import median as _med

    memory = "peak CUDA GiB" if mode == "gpu" else "peak RSS MiB (CPU)"
    lines = [f"| run | status | engine | processes | s/step | {memory} | loss first → last | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        sec = r.get("seconds_per_step") or []
        loss = r.get("loss") or []
        if mode == "gpu" and r.get("peak_cuda_bytes") is not None:
            mem = f"{r['peak_cuda_bytes'] / 2**30:.2f}"
        elif r.get("peak_rss_mib") is not None:
            mem = f"{r['peak_rss_mib']:.0f}"
        else:
            mem = "–"
        lines.append(f"| {r['name']} | {r['status']} | {r['engine'] or '–'} | {r['processes']} | "
                     f"{_med(sec[1:] or sec):.3f} | {mem} | "
                     f"{f'{loss[0]:.4f} → {loss[-1]:.4f}' if loss else '–'} | {r['wall_seconds']:.0f} |")
    table = "\n".join(lines)
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, float32, 2 steps (what CI runs)")
    parser.add_argument("--runs", default=",".join(r[0] for r in RUNS),
                        help="comma-separated subset of the runs (default: all)")
    parser.add_argument("--checkpoint", action="store_true",
                        help="keep dpokit's end-of-run checkpoint (skipped by default: it is not what is timed)")
    parser.add_argument("--workdir", help="keep the model, data and logs here (default: a temporary directory)")
    args = parser.parse_args()
    from _harness import median as _med

    if args.child:
        spec = json.loads(Path(args.child).read_text())
        child = {"dpokit": child_dpokit, "trl": child_trl, "exactness": child_exactness}[spec["library"]]
        result = child(spec)
        if _is_main():
            Path(spec["result"]).write_text(json.dumps(result))
        from dpokit.cli.main import _exit_launched, _process_group_up

        if _process_group_up():  # end as `dpokit` does in a launch: without the interpreter's teardown, in which a
            _exit_launched(0)  # ZeRO-3 process can abort ("terminate called without an active exception")
        return 0

    t0 = time.perf_counter()
    mode = "dry" if args.dry_run else "gpu"
    if mode == "gpu":
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device; run with --dry-run for the CPU check", file=sys.stderr)
            return 2
        device = torch.cuda.get_device_name(0)
    else:
        device = "cpu (dry run)"
    wanted = [n.strip() for n in args.runs.split(",") if n.strip()]
    unknown = sorted(set(wanted) - {r[0] for r in RUNS})
    if unknown:
        parser.error(f"unknown runs {unknown}")
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="dpokit_gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"gpu_check ({mode}, {device}): building tokenizer, model and data in {work} ...", flush=True)
    setup = build(mode, work)
    m = setup["model"]
    s = SHAPES[mode]
    print(f"model: {m['params_total'] / 1e6:.1f}M parameters (hidden {m['hidden']}, {m['layers']} layers, vocab "
          f"{m['vocab']}); {s['steps']} steps of {s['batch_size']} pairs, max_length {s['max_length']}; "
          f"built in {time.perf_counter() - t0:.0f} s", flush=True)

    exactness = run_exactness(mode, setup, work)
    print_exactness(exactness)
    results = []
    for name, library, launcher, options, _ in RUNS:
        if name not in wanted or (mode == "dry" and name in GPU_ONLY):
            continue
        processes = 2 if (launcher and mode == "dry") else 1
        r = run(name, library, launcher, options, mode, setup, work, processes, args.checkpoint)
        r["processes"] = processes
        results.append(r)
        sec = r.get("seconds_per_step") or []
        print(f"{name:13s} {r['status']:6s} engine {str(r['engine']):7s} {_med(sec[1:] or sec):8.3f} s/step  "
              f"({r['wall_seconds']:.0f} s){'  ' + r['error'] if r['error'] else ''}", flush=True)
        if r["status"] != "ok":
            print(f"--- {name}: {r['command']}\n--- log tail:\n{r['log_tail']}\n---", flush=True)

    table = summary_table(results, mode)
    print(f"\ngpu_check summary ({mode}; {device}; model {m['params_total'] / 1e6:.1f}M params; s/step: median over "
          f"the steps after the first; {time.perf_counter() - t0:.0f} s in all)")
    print(table)
    failed = [r["name"] for r in results if r["status"] != "ok"] + ([] if exactness["status"] == "ok" else ["exactness"])
    (work / "gpu_check.json").write_text(json.dumps({"mode": mode, "device": device, "setup": setup,
                                                     "exactness": exactness, "results": results, "table": table},
                                                    indent=1, default=str))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    if failed:
        print(f"\ngpu_check FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    print("\ngpu_check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
