#!/usr/bin/env python
"""Where a dpokit training run's CPU memory goes: RSS at each phase, and what one forward pass saves.

Trains a few steps on the model and data a bench_scale.py run left in its --workdir, and prints VmRSS, VmHWM and
their anonymous / file-backed parts (/proc/self/status) after the imports, after loading the model, after the
engine's prepare, after the policy's forward pass, the reference pass, the backward pass and the optimizer step;
for the first forward pass also the tensors autograd saved (by distinct storage), how many of them are the
parameters' own storage, and the largest kinds. bench/README.md ("Scale", 2026-12-04) has a run.

    python bench/bench_scale.py --rounds 1 --steps 2 --systems dpokit-lora --workdir /tmp/scale_work
    python bench/bench_memory_phases.py /tmp/scale_work --lora-r 16 --steps 2
    MALLOC_MMAP_THRESHOLD_=131072 python bench/bench_memory_phases.py /tmp/scale_work --lora-r 16   # glibc's

Not a test and not part of the benchmark's numbers; a diagnostic (it replaces DPOObjective.__call__ by an
equivalent that marks the phases, for DPO with a reference only).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import sys
import tempfile
from pathlib import Path


def status(field: str) -> float:
    """A /proc/self/status field in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def mark(what: str) -> None:
    print(f"[mem] {what:42s} RSS {status('VmRSS'):6.0f}  HWM {status('VmHWM'):6.0f}  "
          f"anon {status('RssAnon'):6.0f}  file {status('RssFile'):5.0f} MiB", flush=True)


def saved_storages(root) -> dict:
    """Distinct storages autograd saved in the graph behind `root`: data_ptr -> (bytes, node, attribute, shape)."""
    import torch

    seen, stack, found = set(), [root], {}
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for attr in dir(node):
            if not attr.startswith("_saved_"):
                continue
            try:
                value = getattr(node, attr)
            except Exception:  # noqa: BLE001  (some saved values cannot be read back; they are not tensors)
                continue
            for t in value if isinstance(value, (tuple, list)) else [value]:
                if isinstance(t, torch.Tensor) and t.numel() > 0:
                    storage = t.untyped_storage()
                    found.setdefault(storage.data_ptr(), (storage.nbytes(), type(node).__name__, attr, tuple(t.shape)))
        stack.extend(n for n, _ in node.next_functions)
    return found


def report_saved(policy, scorer) -> None:
    found = saved_storages(policy.grad_fn)
    params = {p.untyped_storage().data_ptr() for p in scorer.parameters()}
    views = sum(v[0] for k, v in found.items() if k in params)
    total = sum(v[0] for v in found.values())
    print(f"[saved] {len(found)} distinct storages, {total / 2**20:.0f} MiB; of them the parameters' own storage: "
          f"{views / 2**20:.0f} MiB; activations: {(total - views) / 2**20:.0f} MiB")
    kinds = collections.Counter()
    for ptr, (nbytes, node, attr, shape) in found.items():
        if ptr not in params:
            kinds[(node, attr, shape)] += nbytes
    for (node, attr, shape), nbytes in kinds.most_common(8):
        print(f"[saved]   {nbytes / 2**20:7.1f} MiB  {node}.{attr} {shape}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", help="a bench_scale.py --workdir (holds model/ and pairs.jsonl)")
    parser.add_argument("--lora-r", type=int, default=None, help="LoRA rank (default: full fine-tuning)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--return-freed-memory", action="store_true")
    args = parser.parse_args()

    mark("start")
    import torch

    torch.set_num_threads(1)
    import dpokit.train.run as api
    from dpokit.losses import objective
    from dpokit.config import TrainConfig
    from dpokit.losses.dispatch import preference_loss, preference_metrics

    mark("after imports")
    real_load, real_prepare = api.load_policy, api._prepare
    api.load_policy = lambda *a, **k: (lambda out: (mark("after loading the model (+ adapter)"), out)[1])(
        real_load(*a, **k))
    api._prepare = lambda *a, **k: (lambda out: (mark("after the engine's prepare"), out)[1])(real_prepare(*a, **k))
    first = [True]

    def call(self, scorer, batch):  # DPOObjective.__call__ for the plain DPO loss, with marks between the passes
        policy = scorer(batch)
        mark(f"after the policy forward {tuple(batch.input_ids.shape)}")
        if first[0]:
            report_saved(policy, scorer)
            first[0] = False
        with torch.no_grad():
            reference = self.reference(batch, scorer).float()
        mark("after the reference pass")
        counts = batch.token_counts.float()
        out = preference_loss(policy[0::2], policy[1::2], reference[0::2], reference[1::2], self.loss,
                              chosen_token_counts=counts[0::2], rejected_token_counts=counts[1::2])
        metrics = preference_metrics(out, policy[0::2].detach(), policy[1::2].detach())
        return objective.StepResult(out.losses.sum(), {k: v.detach().float().sum() for k, v in metrics.items()})

    objective.DPOObjective.__call__ = call
    real_step = torch.optim.AdamW.step

    def step(self, *a, **k):
        mark("after the backward pass")
        result = real_step(self, *a, **k)
        mark("after the optimizer step")
        return result

    torch.optim.AdamW.step = step
    import dpokit.train.loop

    dpokit.train.loop.save_checkpoint = lambda *a, **k: mark("end of training (checkpoint skipped)")
    work = Path(args.workdir)
    output = Path(tempfile.mkdtemp(prefix="memory_phases_"))
    lora = {} if args.lora_r is None else {"lora_r": args.lora_r, "lora_alpha": 2 * args.lora_r}
    config = TrainConfig(model=str(work / "model"), data=str(work / "pairs.jsonl"), output=str(output / "run"),
                         batch_size=args.batch_size, max_length=256, max_prompt_length=128, max_steps=args.steps,
                         optimizer="adamw", lr=1e-5, warmup_steps=0, schedule="constant", dtype="float32",
                         beta=0.1, save_final=False, save_every=0, threads=1,
                         return_freed_memory=args.return_freed_memory, **lora)
    try:
        api.train_dpo(config)
    finally:
        shutil.rmtree(output, ignore_errors=True)
    mark("end")


if __name__ == "__main__":
    sys.exit(main())
