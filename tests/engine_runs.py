"""Runs launched by tests/test_engine.py under `accelerate launch` with each engine's config (2 CPU processes).

    accelerate launch --config_file configs/accelerate/ENGINE.yaml --num_processes 2 tests/engine_runs.py \
        OUTPUT MODEL TRAIN EVAL [RUN ...]

Each RUN trains into OUTPUT/RUN with batch 2 x accumulation 2 x 2 processes (a global batch of 8), so that the
test can compare it with one process at batch 8. Several runs share one launch: start-up dominates the time.
"""

import sys

from dpokit.api import train_dpo, train_sft
from dpokit.config import TrainConfig

RUNS = {
    "dpo": (train_dpo, {}),
    "dpo-precompute": (train_dpo, {"precompute_ref": True}),
    "sft": (train_sft, {}),
    "lora": (train_dpo, {"lora_r": 4, "lora_alpha": 8, "optimizer": "adamw"}),
    "dpo-ref-offload": (train_dpo, {"ref_offload": True}),
    "dpo-sync-ref": (train_dpo, {"sync_ref_every": 1, "ref_mixup_alpha": 0.5}),  # TR-DPO: the reference moves
}
# Trained to step 2 (checkpointed), cut back as a crash would leave it, then resumed: must equal "dpo".
RESUMED = "dpo-resumed"
# Any run NAME + SUFFIX is run that way and must equal NAME (e.g. the TR-DPO run, whose reference moves).
SUFFIX = "-resumed"


def resumed_run(options: dict) -> None:
    """Train 2 of 3 steps, keep only checkpoint 2 and its metrics, resume to the end (main process tidies)."""
    import json
    import shutil
    from pathlib import Path

    from accelerate import PartialState

    train_dpo(TrainConfig(**{**options, "max_steps": 2, "save_final": False}))
    out = Path(options["output"])
    if PartialState().is_main_process:
        for name in ("checkpoint-000001",):
            shutil.rmtree(out / name, ignore_errors=True)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= 2))
    PartialState().wait_for_everyone()
    train_dpo(TrainConfig(**{**options, "resume": True}))


def common(model: str, train: str, eval_data: str, output: str) -> dict:
    """The options every run shares (the test's one-process runs use them too, with batch_size 8)."""
    return dict(model=model, data=train, eval_data=eval_data, output=output, max_steps=3, lr=1e-3,
                warmup_steps=1, eval_every=2, seed=3, batch_size=2, grad_accum=2)


if __name__ == "__main__":
    output, model, train, eval_data, *runs = sys.argv[1:]
    for name in runs:
        if name.endswith(SUFFIX):
            resumed_run({**common(model, train, eval_data, f"{output}/{name}"), **RUNS[name[:-len(SUFFIX)]][1]})
            continue
        stage, options = RUNS[name]
        stage(TrainConfig(**{**common(model, train, eval_data, f"{output}/{name}"), **options}))
