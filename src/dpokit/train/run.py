"""A training run wired together: accelerator, tokenizer, data, policy, reference, engine, loop and final model,
for `dpokit dpo` (train_dpo), `dpokit sft` (train_sft) and any reference-free objective (train_objective); the
end of a run (trackers, loop, final model with its card, Hub upload: _run) is `dpokit reward`'s too.

The user's TrainConfig is never changed: what the run derives (lengths fitted to the model, the batch layout the
model supports) is a :class:`dpokit.config.resolved.Resolved`, applied to a copy of the config for the code that
reads those values from it, and recorded beside the options in OUTPUT/run_config.yaml.
"""

from __future__ import annotations

import atexit
import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType
from transformers import PreTrainedTokenizerBase

from dpokit.config import TrainConfig
from dpokit.config.resolved import Resolved
from dpokit.data.validation import check_train_inputs
from dpokit.errors import ConfigError
from dpokit.losses.objective import DPOObjective, KTOObjective, SFTObjective
from dpokit.models.attention import choose_attention, set_attention
from dpokit.models.loading import load_model, load_tokenizer, model_max_positions
from dpokit.models.logprobs import check_layout
from dpokit.models.lora import trained_adapter_weight
from dpokit.runtime.memory import malloc_note, return_freed_blocks
from dpokit.runtime.threads import apply_threads, model_width
from dpokit.train.card import write_model_card
from dpokit.train.checkpoint import run_identity, save_final
from dpokit.train.engine import (ReferenceState, Scorer, check_engine, engine_name, engine_on_cpu, place_reference,
                                 shards_parameters)
from dpokit.train.loop import Engine, config_dict, make_plan, prepare, schedule_warnings, train
from dpokit.train.hub import push_folder
from dpokit.train.moving_reference import MovingReference, check_sync_engine
from dpokit.train.policy import load_policy
from dpokit.train.prepare import PreparedData, prepare_data
from dpokit.train.reference import (CachedReference, ModelReference, PolicyReference, cached_reference_logps,
                                    weights_digest)
from dpokit.train.rundir import claim_output
from dpokit.train.tracking import accelerator_options, start_tracking

RUN_CONFIG = "run_config.yaml"  # in --output: the options as given and, under `resolved:`, what the run derived


def make_accelerator(config: TrainConfig) -> Accelerator:
    """An Accelerator for `config`: its mixed precision, and gloo on CPU-only multi-process launches."""
    # Launched as several processes (torchrun / accelerate launch) on a machine without CUDA: accelerate
    # sets up gloo only when told to use the CPU; otherwise every process would train alone as "main".
    cpu_only = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    if (os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1") and "MASTER_ADDR" in os.environ
            and "WORLD_SIZE" not in os.environ and "OMPI_COMM_WORLD_SIZE" not in os.environ
            and "PMI_SIZE" not in os.environ):
        raise ConfigError("`accelerate launch --cpu` with several processes starts only one (its CPU launcher needs "
                          "mpirun): leave out --cpu; on a machine without GPUs dpokit runs every process on the CPU "
                          "with gloo, under DDP, FSDP2 or DeepSpeed as the --config_file says")
    # accelerate keeps one process-wide state and refuses a second Accelerator with another mixed precision;
    # forget it (not the process group) so that e.g. a float32 SFT and a bfloat16 DPO run in one process.
    AcceleratorState._reset_state(reset_partial_state=False)
    if cpu_only and PartialState._shared_state:  # undo engine_on_cpu of an earlier run in this process
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_CPU
    accelerator = Accelerator(mixed_precision="bf16" if config.dtype == "bfloat16" else "no", cpu=cpu_only,
                              **accelerator_options(config))  # --report-to's trackers
    if cpu_only:
        engine_on_cpu(accelerator)
    atexit.unregister(end_processes)  # once per process, however many runs it starts
    atexit.register(end_processes)
    return accelerator


def end_processes() -> None:
    """Leave a multi-process launch: destroy the process group (accelerate's
    ``PartialState().destroy_process_group()``), so that the other processes see this one's connections close and
    stop at once. Nothing to do without a process
    group. The command line calls it when a command ends, after an error too, and then exits without the
    interpreter's teardown, in which a gloo worker thread could abort the process (dpokit.cli.main._exit_launched);
    a run started from Python (``train_dpo`` under ``accelerate launch``) has it called at exit, so that several
    runs can share one launch."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        PartialState().destroy_process_group()


def fit_lengths(config, log: Callable[[str], None]) -> Resolved:
    """--max-length against the model's maximum positions, read from its config (no weights loaded): the lengths
    the run uses (`config` is a TrainConfig or an EvalConfig, and is not changed)."""
    positions = model_max_positions(config.model, trust_remote_code=getattr(config, "trust_remote_code", False),
                                    gguf_file=config.gguf_file)
    max_length, max_prompt_length, note = config.fit_lengths(positions, config.model)
    if note:
        log(note)
    return Resolved(max_length, max_prompt_length, config.layout)


@dataclass
class _Run:
    """What both training stages start from: `config` is the user's options with `resolved` applied."""

    accelerator: Accelerator
    log: Callable[[str], None]
    tokenizer: PreTrainedTokenizerBase
    data: PreparedData
    model: torch.nn.Module
    reference_state: ReferenceState | None
    config: TrainConfig
    resolved: Resolved
    stage: str = "dpo"  # dpo, kto, sft or reward: what the model card says


def _start(given: TrainConfig, stage: str) -> _Run:
    """Accelerator, seed, tokenizer, tokenised data and policy for `stage`, with the lengths fitted to the model."""
    accelerator = make_accelerator(given)
    check_engine(accelerator)
    if stage == "dpo" and given.sync_ref_every:
        check_sync_engine(accelerator)
    if shards_parameters(accelerator) and (given.load_in_4bit or given.load_in_8bit):
        raise ConfigError(f"--load-in-4bit/8bit under {engine_name(accelerator)} is not supported: quantized weights "
                          "are not sharded; launch QLoRA with DDP (configs/accelerate/ddp.yaml) or one process")
    torch.manual_seed(given.seed)
    log = print if accelerator.is_main_process else (lambda *_: None)
    tokenizer = load_tokenizer(given.model, trust_remote_code=given.trust_remote_code, gguf_file=given.gguf_file)
    resolved = fit_lengths(given, log)
    config = resolved.applied(given)
    data = prepare_data(config, stage, tokenizer, log)
    # everything that needs no model is checked before one is loaded: the data, the plan and the schedule
    plan = make_plan(len(data.train), config, accelerator.num_processes)
    for line in schedule_warnings(plan, config, eval_examples=len(data.eval)):
        log(line)
    with_reference = stage in ("dpo", "kto") and not config.reference_free and config.ref_model is None
    if accelerator.device.type == "cpu":
        log(malloc_note())
        if config.return_freed_memory and not return_freed_blocks():  # before anything large is allocated
            log("--return-freed-memory: not applied (not glibc's malloc, e.g. jemalloc preloaded, "
                "or MALLOC_MMAP_THRESHOLD_ is set)")
    model, reference_state = load_policy(config, accelerator.device, with_reference=with_reference)
    set_attention(model, choose_attention(config.attention, accelerator.device, config.layout))
    apply_threads(config.threads, width=model_width(model), device=accelerator.device, log=log)
    return _Run(accelerator, log, tokenizer, data, model, reference_state, config, resolved, stage)


def _reference_model(config: TrainConfig, run: _Run, chunked: bool) -> tuple[Scorer, str]:
    """A separate reference model (--ref-model, or a fresh copy of --model's starting weights), its digest
    taken before the engine places it like the policy."""
    path = config.ref_model or config.model
    model = load_model(path, dtype=config.ref_dtype or config.dtype, trust_remote_code=config.trust_remote_code,
                       gguf_file=None if config.ref_model else config.gguf_file)
    digest = weights_digest(model)
    set_attention(model, choose_attention(config.attention, run.accelerator.device, config.layout))
    placed = place_reference(run.accelerator, Scorer(model, chunked=chunked), offload=config.ref_offload)
    return placed, digest


def _references(config: TrainConfig, run: _Run, engine: Engine, chunked: bool, start_digest: str | None):
    """The reference for training and for evaluation: inside the policy's weights (LoRA), a resident frozen
    model placed like the policy, or two cached tables computed before the first step by every process."""
    if run.reference_state is not None and not config.precompute_ref:
        return PolicyReference(), PolicyReference()
    if not config.precompute_ref:
        reference = ModelReference(_reference_model(config, run, chunked)[0])
        return reference, reference
    if run.reference_state is not None:  # the reference is in the policy's own (frozen) weights
        score, digest = (lambda batch: engine.scorer(batch, reference=True)), start_digest
    elif config.ref_model is None and engine.step == 0:  # the policy before its first update is the reference
        score, digest = engine.scorer, start_digest
    else:  # another model, or a resumed policy that has moved: score with a separate copy
        score, digest = _reference_model(config, run, chunked)
    cache = config.ref_cache_dir or str(config.output_dir / "ref_cache")
    kwargs = dict(batch_size=config.eval_batch_size or config.batch_size, layout=config.layout, chunked=chunked,
                  accelerator=run.accelerator, log=run.log)
    was_training = engine.scorer.training
    engine.scorer.eval()
    train_table = cached_reference_logps(score, digest, run.tokenizer, run.data.train, cache, **kwargs)[0]
    eval_table = None
    if run.data.eval:
        eval_table = cached_reference_logps(score, digest, run.tokenizer, run.data.eval, cache,
                                            description="reference log-probs (eval)", **kwargs)[0]
    engine.scorer.train(was_training)
    # a separate reference model goes out of scope here: it is not kept in memory during training
    return CachedReference(train_table), None if eval_table is None else CachedReference(eval_table)


def _moving_reference(config: TrainConfig, reference: ModelReference, engine: Engine) -> MovingReference:
    """TR-DPO: the resident reference, moved toward the policy every --sync-ref-every steps; a resumed run's
    taken back from its checkpoint (it has moved since the start)."""
    policy = engine.accelerator.unwrap_model(engine.scorer)  # the policy's Scorer (FSDP2 wraps it in place)
    moving = MovingReference(reference.model, policy, config.sync_ref_every, config.ref_mixup_alpha)
    if engine.resumed_from is not None:
        moving.load(engine.resumed_from)
    return moving


def _claim(config: TrainConfig):
    """Hold --output for this run (a lock; no silent reuse of another run's directory): see rundir.py."""
    return claim_output(config.output_dir, resume=config.resume, overwrite=config.overwrite,
                        main_process=int(os.environ.get("RANK", "0")) == 0)


def train_dpo(config: TrainConfig) -> dict[str, float]:
    """Fine-tune `config.model` with DPO on `config.data`; returns the final evaluation metrics."""
    check_train_inputs(config)
    config.check_hub()
    with _claim(config):
        return _train_dpo(config)


def _train_dpo(given: TrainConfig) -> dict[str, float]:
    loss = given.loss_config()
    run = _start(given, "kto" if loss.unpaired else "dpo")
    chunked = given.logits == "chunked"
    start_digest = None
    if given.precompute_ref and not loss.reference_free and given.ref_model is None:
        # taken before a checkpoint's weights are loaded or the engine shards the model; a LoRA run's trained
        # adapter is left out, since its reference never uses it
        start_digest = weights_digest(run.model, skip=trained_adapter_weight if given.uses_lora else lambda n: False)
    engine = _prepare(run, given, chunked)
    config = run.config  # the options with the layout the model supports
    reference, eval_reference = (None, None) if loss.reference_free else \
        _references(config, run, engine, chunked, start_digest)
    if config.sync_ref_every:
        engine.moving_reference = _moving_reference(config, reference, engine)
    if loss.unpaired:
        objective = KTOObjective(loss, reference, torch.tensor(run.data.train_labels))
        eval_objective = KTOObjective(loss, eval_reference, torch.tensor(run.data.eval_labels)) \
            if run.data.eval else None
    else:
        objective = DPOObjective(loss, reference, average_logps=config.average_logps)
        eval_objective = DPOObjective(loss, eval_reference, average_logps=config.average_logps) \
            if run.data.eval else None
    return _run(run, engine, objective, eval_objective)


def train_sft(config: TrainConfig) -> dict[str, float]:
    """Supervised fine-tuning of `config.model` on completions (or the chosen responses of a preference set)."""
    return train_objective(config, "sft", SFTObjective())


def train_objective(config: TrainConfig, stage: str, objective) -> dict[str, float]:
    """Train `config.model` on `config.data` with any reference-free `objective` (dpokit.losses.objective): the loop,
    data, checkpoints and final model of `dpokit sft` (`stage` "sft": completions or chosen responses) or of
    `dpokit dpo` (`stage` "dpo": preference pairs; `config.reference_free` must be set, since no reference is
    given to the objective). Returns the final evaluation metrics."""
    if stage == "dpo" and not config.reference_free:
        raise ConfigError("train_objective: set reference_free (no reference model is set up for the objective)")
    check_train_inputs(config)
    config.check_hub()
    with _claim(config):
        run = _start(config, stage)
        engine = _prepare(run, config, config.logits == "chunked")
        return _run(run, engine, objective, objective)


def _prepare(run: _Run, given: TrainConfig, chunked: bool) -> Engine:
    """The engine-wrapped policy, with the batch layout checked on it (every process takes part); the layout it
    settles on goes into `run.resolved` and `run.config`, and both into OUTPUT/run_config.yaml."""
    config = run.config
    # the run's identity is its options with the fitted lengths and the layout asked for (as it always was), so
    # that a resumed run compares like with like
    identity = run_identity(config_dict(config), run.data.train, config.model)
    engine = prepare(run.model, len(run.data.train), config, run.accelerator, chunked=chunked,
                     reference_state=run.reference_state, identity=identity, log=run.log)
    layout = check_layout(engine.scorer, run.data.train, config.layout, run.tokenizer.pad_token_id,
                          device=run.accelerator.device, max_length=config.max_length)
    run.resolved = Resolved(run.resolved.max_length, run.resolved.max_prompt_length, layout)
    run.config = run.resolved.applied(given)
    if run.accelerator.is_main_process:
        write_run_config(given, run.resolved)
    return engine


def write_run_config(config: TrainConfig, resolved: Resolved) -> None:
    """OUTPUT/run_config.yaml: the options as given, and under ``resolved:`` what the run derived from them."""
    record = {**config_dict(config), "resolved": resolved.as_dict()}
    config.output_dir.mkdir(parents=True, exist_ok=True)
    (config.output_dir / RUN_CONFIG).write_text(yaml.safe_dump(record, sort_keys=False))


def _run(run: _Run, engine: Engine, objective, eval_objective) -> dict[str, float]:
    config = run.config
    tracking = start_tracking(run.accelerator, config, config_dict(config), engine.model, run.tokenizer,
                              run.data.eval, sharded=shards_parameters(run.accelerator), step=engine.step,
                              log=run.log)
    try:
        metrics = train(engine, run.tokenizer, objective, run.data.train, run.data.eval, config,
                        eval_objective=eval_objective, tracking=tracking)
    finally:
        tracking.finish()
    if config.save_final:
        final = save_final(config.output_dir / "final", engine, run.tokenizer, _final_files(run, engine, metrics))
        what = ("reward " if run.stage == "reward" else "") + ("adapter" if config.uses_lora else "model")
        run.log(f"saved the trained {what} to {final}")
    run.accelerator.wait_for_everyone()
    if config.push_to_hub and run.accelerator.is_main_process:  # after the barrier: a failed push stops no peer
        final = config.output_dir / "final"
        url = push_folder(final, config.push_to_hub, private=config.hub_private, revision=config.hub_revision,
                          message=f"dpokit {run.stage}: {engine.plan.total_steps} steps")
        run.log(f"pushed {final} to the Hub: {url}")
    return metrics


def _final_files(run: _Run, engine: Engine, metrics: dict[str, float]) -> Callable:
    """What final/ holds besides the model and tokenizer, written into its temporary directory so that the
    directory appears whole: the final metrics and the model card (README.md)."""
    def write(tmp) -> None:
        (tmp / "dpokit_metrics.json").write_text(json.dumps(metrics, indent=1))
        write_model_card(tmp, run.config, run.stage, steps=engine.plan.total_steps,
                         processes=run.accelerator.num_processes, eval_metrics=metrics)
    return write
