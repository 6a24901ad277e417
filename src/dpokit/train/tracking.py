"""Experiment trackers through accelerate's tracking API (TensorBoard, Weights & Biases, MLflow, trackio, Comet).

The Accelerator is created with the trackers `--report-to` names (:func:`accelerator_options`); a run starts them
with its resolved config as hyperparameters (``init_trackers``), every metrics.jsonl row goes to them as well, at
the same step, keys ``train/NAME`` and ``eval/NAME`` (dpokit.train.metrics.MetricsLogger calls :meth:`Tracking.log`),
and each evaluation logs a table of a few held-out prompts with the policy's samples to the trackers that have
tables (wandb, mlflow, trackio, comet_ml). A resumed run continues the tracker runs it started (their identities are kept in
OUTPUT/tracker_runs.json: dpokit.train.tracker_runs).

The samples are greedy (no random numbers are drawn, so a run samples and resumes to the same weights as without
them) continuations of the evaluation set's own prompt token ids, exactly as training tokenised them (chat
template included), a handful at a time and a few dozen tokens long. They are sampled here with transformers'
``generate`` rather than dpokit.eval.generation, which renders prompt text and may not be imported by train/.
Under FSDP2 and ZeRO-3 (the weights sharded over the processes) no table is logged: sampling would be a collective.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from transformers import GenerationConfig, PreTrainedTokenizerBase

from dpokit.config import TrainConfig
from dpokit.config.tracking import TABLE_TRACKERS, TrackingOptions
from dpokit.data.chat import end_of_turn_id
from dpokit.data.tokenize import TokenizedExample
from dpokit.data.vision import stack_vision
from dpokit.train.tracker_runs import (forget_tracker_runs, identities, init_kwargs, read_tracker_runs,
                                       store_config, write_tracker_runs)

SAMPLES = "samples"  # the table's name
COLUMNS = ["step", "prompt", "sample"]


def accelerator_options(config) -> dict:
    """The Accelerator arguments that set up `config`'s trackers (a TrainConfig or a RewardConfig): none for a
    config without tracking options (dpokit eval's) or with no tracker. TensorBoard writes under
    OUTPUT/tensorboard/PROJECT."""
    trackers = config.trackers() if isinstance(config, TrackingOptions) else ()
    if not trackers:
        return {}
    output = Path(config.output)
    return {"log_with": list(trackers),
            "project_config": ProjectConfiguration(project_dir=str(output), logging_dir=str(output / "tensorboard"))}


def run_name(config: TrainConfig) -> str:
    """--run-name, or the name of the --output directory."""
    return config.run_name or Path(config.output).resolve().name


class Tracking:
    """A run's trackers (those of `accelerator`, from :func:`accelerator_options`) and what it samples for them."""

    def __init__(self, accelerator: Accelerator, config: TrainConfig, model: torch.nn.Module | None = None,
                 tokenizer: PreTrainedTokenizerBase | None = None, prompts: Sequence[TokenizedExample] = (),
                 step: int = 0, log: Callable[[str], None] = print) -> None:
        self.accelerator = accelerator
        self.config = config
        self.model, self.tokenizer, self.prompts = model, tokenizer, list(prompts)
        self.step = step  # where the run starts: a resumed run's checkpoint step
        self.say = log  # a line for the user (self.log is the metrics' way to the trackers)
        self.started = False

    def start(self, hyperparameters: dict) -> None:
        """Start the trackers (main process), the run's resolved options as their hyperparameters: the tracker
        runs OUTPUT/tracker_runs.json records when the run resumes (dpokit.train.tracker_runs), new ones
        otherwise; the file then records the runs started."""
        main, output = self.accelerator.is_main_process, self.config.output_dir
        resume = self.config.resume
        if not getattr(self.accelerator, "log_with", None):
            if main and not resume:
                forget_tracker_runs(output)
            return
        saved = read_tracker_runs(output) if main and resume else {}
        name = run_name(self.config)
        kwargs = init_kwargs(saved, name, output, self.step if resume else None, self.say) if main else {}
        # the hyperparameters are stored tracker by tracker, not by init_trackers: a continued MLflow run must
        # not be given a changed parameter (tracker_runs.store_config)
        self.accelerator.init_trackers(self.config.project, init_kwargs=kwargs)
        self.started = True
        if not main:
            return
        continued = kwargs["mlflow"].get("run_id")
        for tracker in self.accelerator.trackers:
            store_config(tracker, hyperparameters, continued)
        if "comet_ml" in self._names():
            experiment = self.accelerator.get_tracker("comet_ml", unwrap=True)
            experiment.set_name(name)
            # dpokit logs every metric itself: with comet_ml imported before mlflow or tensorboard (as Comet
            # advises), Comet's auto-logging would also copy those trackers' calls, each step's loss twice
            experiment.disable_mp()
        runs = identities(self.accelerator.trackers, self.say, saved)
        write_tracker_runs(output, {**saved, **runs})  # a resume keeps the runs of trackers it did not start

    def _names(self) -> list[str]:
        return [tracker.name for tracker in self.accelerator.trackers] if self.started else []

    def log(self, split: str, step: int, values: dict[str, float]) -> None:
        """One metrics.jsonl row, to every tracker: keys ``SPLIT/NAME``, at `step`."""
        if self.started:
            self.accelerator.log({f"{split}/{key}": value for key, value in values.items()}, step=step)

    def log_samples(self, step: int) -> None:
        """The policy's greedy samples of the held-out prompts, as a table, to the trackers that have tables."""
        tables = [name for name in self._names() if name in TABLE_TRACKERS]
        if not tables or not self.prompts or not self.accelerator.is_main_process:
            return
        texts = greedy_samples(self.model, self.tokenizer, self.prompts, self.config.log_sample_tokens,
                               self.accelerator)
        rows = [[step, self.tokenizer.decode(e.prompt_ids, skip_special_tokens=True), text]
                for e, text in zip(self.prompts, texts)]
        for name in tables:
            _log_table(self.accelerator.get_tracker(name), name, rows, step)

    def finish(self) -> None:
        """End the trackers' runs (main process); nothing collective."""
        if self.started and self.accelerator.is_main_process:
            for tracker in self.accelerator.trackers:
                tracker.finish()
        self.started = False


def _log_table(tracker, name: str, rows: list[list], step: int) -> None:
    """`rows` (COLUMNS) as a table of `tracker`: accelerate's log_table for W&B; MLflow, trackio and Comet have no
    table call in accelerate, so their own (the run accelerate started is the active one; Comet's experiment)."""
    if name == "wandb":
        tracker.log_table(SAMPLES, columns=COLUMNS, data=rows, step=step)
    elif name == "mlflow":
        import mlflow

        mlflow.log_table({c: [row[i] for row in rows] for i, c in enumerate(COLUMNS)},
                         artifact_file=f"{SAMPLES}/step_{step:06d}.json")
    elif name == "trackio":
        import trackio

        tracker.log({SAMPLES: trackio.Table(columns=COLUMNS, data=rows)}, step=step)
    elif name == "comet_ml":  # a table is a CSV asset of the experiment in Comet
        tracker.tracker.log_table(f"{SAMPLES}_step_{step:06d}.csv", tabular_data=rows, headers=COLUMNS)


def sample_prompts(examples: Sequence[TokenizedExample], count: int) -> list[TokenizedExample]:
    """The examples of the first `count` distinct prompts of `examples` (looking at no more than 10 × count)."""
    found: dict[tuple[int, ...], TokenizedExample] = {}
    for i in range(min(len(examples), 10 * count)):
        if len(found) == count:
            break
        found.setdefault(tuple(examples[i].prompt_ids), examples[i])
    return list(found.values())


@torch.no_grad()
def greedy_samples(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[TokenizedExample],
                   max_new_tokens: int, accelerator: Accelerator) -> list[str]:
    """Greedy continuations of the prompts of `prompts`, in one left-padded batch with their images (a
    vision-language model's image inputs, placed where each prompt starts), stopped at EOS or the chat template's
    end of turn; the texts without special tokens. The model's train/eval mode is restored."""
    stops = [t for t in (tokenizer.eos_token_id, end_of_turn_id(tokenizer)) if t is not None]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    width = max(len(e.prompt_ids) for e in prompts)
    ids = torch.tensor([[pad] * (width - len(e.prompt_ids)) + list(e.prompt_ids) for e in prompts],
                       device=accelerator.device)
    mask = torch.tensor([[0] * (width - len(e.prompt_ids)) + [1] * len(e.prompt_ids) for e in prompts],
                        device=accelerator.device)
    images = stack_vision([(e, row, width - len(e.prompt_ids)) for row, e in enumerate(prompts)], len(prompts), width)
    images = {k: v.to(accelerator.device) for k, v in images.items()}
    settings = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops, pad_token_id=pad)
    was_training = model.training
    model.eval()
    try:
        with accelerator.autocast():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=settings, **images)
    finally:
        model.train(was_training)
    texts = []
    for row in out[:, width:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    return texts


def start_tracking(accelerator: Accelerator, config: TrainConfig, hyperparameters: dict, model: torch.nn.Module,
                   tokenizer: PreTrainedTokenizerBase, eval_examples: Sequence[TokenizedExample], *, sharded: bool,
                   step: int = 0, log=print) -> Tracking:
    """The run's trackers, started with `hyperparameters` at `step` (a resumed run's checkpoint step: the tracker
    runs it started continue); with a table tracker, an evaluation set and --log-samples, the prompts its samples
    table shows (none when the weights are `sharded` over processes)."""
    prompts: list[TokenizedExample] = []
    if config.log_samples and eval_examples and any(t in TABLE_TRACKERS for t in config.trackers()):
        if sharded:
            log("--log-samples: no samples table under FSDP2 or ZeRO-3 (sampling sharded weights is a collective)")
        else:
            prompts = sample_prompts(eval_examples, config.log_samples)
    tracking = Tracking(accelerator, config, model, tokenizer, prompts, step, log)
    tracking.start(hyperparameters)
    return tracking
