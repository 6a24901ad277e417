"""Runs launched by tests/train/test_engine.py under `accelerate launch` with each engine's config (2 CPU processes).

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
    # --streaming: the shards written by the first process into a fresh cache directory (data_cache_dir, set
    # below), or into a temporary entry (no cache); the other reads them
    "dpo-streaming": (train_dpo, {"streaming": True}),
    "dpo-streaming-uncached": (train_dpo, {"streaming": True, "data_cache": False}),
    # tests/train/test_engine_resume.py: 4 steps of batch 2 x 2 processes, a checkpoint every 2, no evaluation
    "dpo4": (train_dpo, {"max_steps": 4, "save_every": 2, "grad_accum": 1, "eval_data": None}),
    "dpo4-killed": (train_dpo, {"max_steps": 4, "save_every": 2, "grad_accum": 1, "eval_data": None}),
}
# the in-memory run that each of these must equal (in weights and metrics)
SAME_AS = {"dpo-streaming": "dpo", "dpo-streaming-uncached": "dpo"}
# Trained to step 2 (checkpointed), cut back as a crash would leave it, then resumed: must equal "dpo".
RESUMED = "dpo-resumed"
# Any run NAME + SUFFIX is run that way and must equal NAME (e.g. the TR-DPO run, whose reference moves).
SUFFIX = "-resumed"
STREAMING_RESUMED = "dpo-streaming" + SUFFIX  # its resume reads the shards cached by its first part
# "resume-NAME": run NAME with --resume into OUTPUT/NAME (after a launch that was killed)
RESUME = "resume-"
# ENGINE_RUNS_PAUSE_IN_SAVE=STEP: the checkpoint of step STEP stops half-written, each process at its fault point
# (DeepSpeed: every process, after writing its optimizer partition; otherwise the main process, with every file
# of the checkpoint written but its manifest), after creating OUTPUT/paused-rank<RANK>; the test then kills the
# processes (their ids in OUTPUT/pid-rank<RANK>) and the launcher.
PAUSE = "ENGINE_RUNS_PAUSE_IN_SAVE"


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


def count_streamed_writers(output: str) -> None:
    """Record, per process, how many entries --streaming starts writing (only each node's first process may),
    in OUTPUT/writers-rank<RANK>.txt when the process ends."""
    import atexit
    import os
    from pathlib import Path

    import dpokit.data.streaming
    from dpokit.data.cache import CacheWriter

    started = []

    class CountedWriter(CacheWriter):
        def __init__(self, *args, **kwargs):
            started.append(args[1])
            super().__init__(*args, **kwargs)

    dpokit.data.streaming.CacheWriter = CountedWriter
    rank = os.environ.get("RANK", "0")
    atexit.register(lambda: Path(f"{output}/writers-rank{rank}.txt").write_text(f"{len(started)}\n"))


def pause_in_save(output: str, step: int) -> None:
    """Install the fault points of PAUSE: wait there (for SIGKILL) once OUTPUT/paused-rank<RANK> exists."""
    import os
    import time
    from pathlib import Path

    import dpokit.train.checkpoint as checkpoint

    directory = f"checkpoint-{step:06d}"
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"

    rank = os.environ.get("RANK", "0")
    Path(f"{output}/pid-rank{rank}").write_text(str(os.getpid()))  # the launcher starts each in its own session

    def pause() -> None:
        Path(f"{output}/paused-rank{rank}").write_text("")
        while True:
            time.sleep(1)

    manifest = checkpoint.write_manifest

    def write_manifest(path):
        if Path(path).name.startswith(directory) and not deepspeed:
            pause()
        manifest(path)

    checkpoint.write_manifest = write_manifest
    if deepspeed:
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        save = TorchCheckpointEngine.save

        def save_then_pause(self, state_dict, path):
            save(self, state_dict, path)
            if f"{directory}." in str(path) and "optim_states" in str(path):
                pause()

        TorchCheckpointEngine.save = save_then_pause


# engine_runs.py --cli ARGS...: the dpokit command line, `dpokit ARGS...` (tests/train/test_exits.py), with FAIL's hook
CLI = "--cli"
# ENGINE_RUNS_FAIL_AT=RANK:STEP: process RANK raises a TrainingError in training step STEP, after writing the time
# to failed-at in the working directory (the test measures how soon the other processes stop after it)
FAIL = "ENGINE_RUNS_FAIL_AT"


def fail_at(spec: str) -> None:
    """Install FAIL's hook (`spec` is its value) in this process, if it is the one to fail."""
    import os
    import time
    from pathlib import Path

    import dpokit.train.loop as loop
    from dpokit.errors import TrainingError

    rank, step = (int(part) for part in spec.split(":"))
    if int(os.environ.get("RANK", "0")) != rank:
        return
    train_step = loop.train_step

    def failing(engine, objective, batches, done, *args, **kwargs):
        if done + 1 == step:
            Path("failed-at").write_text(repr(time.time()))
            raise TrainingError(f"the test's failure in step {step} of process {rank}")
        return train_step(engine, objective, batches, done, *args, **kwargs)

    loop.train_step = failing


if __name__ == "__main__":
    if sys.argv[1] == CLI:
        import os

        from dpokit.cli.main import main

        if os.environ.get(FAIL):
            fail_at(os.environ[FAIL])
        sys.exit(main(sys.argv[2:]))
    import os

    output, model, train, eval_data, *runs = sys.argv[1:]
    count_streamed_writers(output)
    if os.environ.get(PAUSE):
        pause_in_save(output, int(os.environ[PAUSE]))
    for name in runs:
        if name.startswith(RESUME):
            name = name[len(RESUME):]
            stage, options = RUNS[name]
            stage(TrainConfig(**{**common(model, train, eval_data, f"{output}/{name}"), **options, "resume": True}))
            continue
        # a streamed run writes its own cache entry: the shared one of the in-memory runs would only be reused
        cache = {"data_cache_dir": f"{output}/{name}-data-cache"} if "streaming" in name else {}
        if name.endswith(SUFFIX):
            resumed_run({**common(model, train, eval_data, f"{output}/{name}"), **RUNS[name[:-len(SUFFIX)]][1],
                         **cache})
            continue
        stage, options = RUNS[name]
        stage(TrainConfig(**{**common(model, train, eval_data, f"{output}/{name}"), **options, **cache}))
    # end as `dpokit` does in a launch: without the interpreter's teardown, in which a ZeRO-3 process can abort
    # ("terminate called without an active exception") after its runs have finished
    from dpokit.cli.main import _exit_launched

    _exit_launched(0)
