"""Vision-language DPO runs, launched by tests/train/test_engine_vision.py under `accelerate launch` with an engine's
config (2 CPU processes) and run by the same test in one process (tests/vlm_helpers.py's tiny LLaVA, image pairs).

    accelerate launch --config_file configs/accelerate/ENGINE.yaml --num_processes 2 tests/engine_runs_vision.py \
        OUTPUT MODEL TRAIN EVAL [RUN ...]

Each RUN trains into OUTPUT/RUN, its batch split over the 2 processes so that the global batch is the one-process
run's. A run NAME + "-resumed" trains to its checkpoint of step 2 and then `--resume`s to the end, and must equal NAME.
"""

import sys

from dpokit.api import train_dpo
from dpokit.config import TrainConfig

# name -> (options, the batch of one process, the batch and accumulation of each of 2 processes)
RUNS = {
    # 2 steps of 8 pairs, evaluated at step 2 on an odd number of pairs (the processes score different counts)
    "vlm": ({"max_steps": 2, "eval_every": 2}, {"batch_size": 8}, {"batch_size": 2, "grad_accum": 2}),
    # 4 steps, a checkpoint every 2 (RMSprop's running averages and the warm-up's step carry over a resume)
    "vlm4": ({"max_steps": 4, "save_every": 2, "eval_data": None},
             {"batch_size": 4}, {"batch_size": 2}),
    # vlm4 with a LoRA adapter on the language model
    "lora4": ({"max_steps": 4, "save_every": 2, "eval_data": None, "lora_r": 4, "lora_alpha": 8},
              {"batch_size": 4}, {"batch_size": 2}),
}
SUFFIX = "-resumed"


def options(name: str, model: str, train: str, eval_data: str, output: str, processes: int) -> dict:
    """The TrainConfig values of run `name` (without SUFFIX) on `processes` processes (1 or 2)."""
    own, one, two = RUNS[name]
    # lr 1e-4: RMSprop's first step is about 10 x lr x sign(gradient), so a weight whose gradient sums to nearly zero
    # over the batch moves by what rounding leaves of it, which differs with the split into processes; at 1e-3 that
    # reached 2.3e-5 on a few weights, at 1e-4 it stays near 2e-6, while the weights still move by ~1e-3
    return {"model": model, "data": train, "eval_data": eval_data, "output": output, "lr": 1e-4, "warmup_steps": 1,
            "seed": 3, "grad_accum": 1, **(one if processes == 1 else two), **own}


def resumed(values: dict) -> None:
    """Train to the checkpoint of step 2 without a final model, then --resume to the run's last step."""
    train_dpo(TrainConfig(**{**values, "max_steps": 2, "save_final": False}))
    train_dpo(TrainConfig(**{**values, "resume": True}))


if __name__ == "__main__":
    output, model, train, eval_data, *names = sys.argv[1:]
    for run in names:
        base = run.removesuffix(SUFFIX)
        values = options(base, model, train, eval_data, f"{output}/{run}", processes=2)
        if run.endswith(SUFFIX):
            resumed(values)
        else:
            train_dpo(TrainConfig(**values))
    # end as `dpokit` does in a launch: without the interpreter's teardown, in which a ZeRO-3 process can abort
    # ("terminate called without an active exception") after its runs have finished
    from dpokit.cli.main import _exit_launched

    _exit_launched(0)
