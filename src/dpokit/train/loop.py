"""The one training loop, shared by SFT and DPO: accumulate, reduce, clip, step, evaluate, log, checkpoint.

Data parallelism: each process scores its slice of every global batch; the objective's loss sums are divided
by the divisor of the whole global batch (all micro-batches, all processes). The engine accelerate was launched
with (DDP, FSDP2, DeepSpeed ZeRO; see engine.py) synchronises the gradients, so the update is the same for any
split of a global batch into processes and micro-batches (tests/train/test_loop.py and tests/train/test_engine.py
check it for every engine).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from dpokit.data.batching import Batch, collate, forward_groups
from dpokit.train.checkpoint import (check_resumable, checkpoint_step, latest_checkpoint, load_model_weights,
                               load_trainer_state, prune_checkpoints, save_checkpoint)
from dpokit.config import TrainConfig
from dpokit.train.engine import (ReferenceState, Scorer, check_engine, configure_deepspeed, engine_name, micro_step,
                           shards_parameters, unwrap_optimizer)
from dpokit.errors import ConfigError, Interrupted, TrainingError
from dpokit.train.metrics import MetricsLogger, truncate_metrics
from dpokit.train.moving_reference import MovingReference
from dpokit.losses.objective import Objective
from dpokit.runtime.threads import refresh_threads
from dpokit.data.tokenize import TokenizedExample
# make_plan and schedule_warnings stay importable from here: dpokit.api imports them from this module
from dpokit.train.schedule import Plan, lr_factor, make_plan, schedule_warnings, step_indices  # noqa: F401
from dpokit.train.early_stop import EarlyStopping
from dpokit.train.stop import StopRequests
from dpokit.train.tracking import Tracking


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """RMSprop (the paper's), AdamW, or bitsandbytes' 8-bit AdamW over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters (a LoRA adapter loaded for inference only?)")
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer.endswith("8bit"):
        import bitsandbytes as bnb

        kind = bnb.optim.PagedAdamW8bit if config.optimizer.startswith("paged") else bnb.optim.AdamW8bit
        return kind(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=_fusable(params) or None)


def _fusable(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW (one kernel per tensor instead of six passes over it: 5x faster on a CPU,
    bench/bench_optimizer.py) takes these parameters: plain CPU or CUDA floating-point tensors (not the FSDP2
    shards, DTensors)."""
    from torch.distributed.tensor import DTensor

    return all(type(p) is torch.nn.Parameter and not isinstance(p, DTensor) and p.is_floating_point()
               and p.device.type in ("cpu", "cuda") for p in params)


def disable_dropout(model: nn.Module) -> None:
    """Dropout off, in case the config has it on: DPO compares log-probs, which must be deterministic.

    Besides nn.Dropout modules, attention layers of many families (Llama, Mistral, Qwen2, ...) keep their
    attention dropout as a float attribute passed to the attention kernel in training mode; zero those too.
    A LoRA adapter's own dropout (``--lora-dropout``, default 0) is left as asked: it acts on the trained
    adapter path only, never on the reference, which runs with the adapter disabled or in eval mode.
    """
    for name, module in model.named_modules():
        if "lora_dropout" in name:
            continue
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if isinstance(value, float) and ("dropout" in name or "pdrop" in name):
                setattr(module, name, 0.0)


def forward_tokens(config: TrainConfig, device: torch.device) -> int:
    """The token budget of one forward pass: `config.forward_tokens`, or by default 1024 on CPU, unlimited on GPU."""
    if config.forward_tokens is not None:
        return config.forward_tokens
    return 1024 if device.type == "cpu" else 0


def _sequence_tokens(examples: Sequence[TokenizedExample]) -> int:
    """Tokens of every prompt+response sequence, as a padded layout would see them (a layout-fair count)."""
    return sum(len(e.prompt_ids) * len(e.responses) + sum(map(len, e.responses)) for e in examples)


@torch.no_grad()
def evaluate(scorer: nn.Module, objective: Objective, examples: Sequence[TokenizedExample], config: TrainConfig,
             accelerator: Accelerator, pad_token_id: int, desc: str = "eval") -> dict[str, float]:
    """Mean metrics of `objective` over `examples`, sharded across processes.

    Every process runs the same number of batches (a process whose share has run out scores a stand-in batch
    and discards it), because under FSDP2 and ZeRO-3 each forward pass gathers weights from all processes.
    """
    was_training = scorer.training
    scorer.eval()
    batch_size = config.eval_batch_size or config.batch_size
    mine = list(range(accelerator.process_index, len(examples), accelerator.num_processes))
    rounds = math.ceil(math.ceil(len(examples) / accelerator.num_processes) / batch_size)
    sums = {k: torch.zeros((), dtype=torch.float64, device=accelerator.device) for k in _metric_names(objective)}
    divisor = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    counts = {k: torch.zeros_like(divisor) for k in sums}  # the metrics averaged over counts of their own
    own = set()
    for k in tqdm(range(rounds), desc=desc, disable=not accelerator.is_main_process or rounds < 4, leave=False):
        ids = mine[k * batch_size : (k + 1) * batch_size]
        real = bool(ids)
        ids = ids or [0]
        batch = micro_batches(objective, examples, ids, config.layout, pad_token_id, 0)[0].to(accelerator.device)
        with accelerator.autocast():
            result = objective(scorer, batch)
        own.update(result.metric_counts)  # on every process alike, stand-in batches included
        if real:
            divisor += objective.divisor(batch)
            for key, value in result.metric_sums.items():
                sums[key] += value.double()
            for key, value in result.metric_counts.items():
                counts[key] += value.double()
    keys = sorted(sums)
    totals = accelerator.reduce(torch.stack([divisor] + [sums[k] for k in keys] + [counts[k] for k in keys]),
                                reduction="sum")
    scorer.train(was_training)
    return {k: _mean(totals[i + 1], totals[i + 1 + len(keys)] if k in own else totals[0])
            for i, k in enumerate(keys)}


def _mean(total: torch.Tensor, count: torch.Tensor) -> float:
    """total / count; NaN for a count of 0 (e.g. KTO's rewards/chosen of a batch with no desirable example)."""
    return (total / count).item() if count > 0 else float("nan")


def micro_batches(objective: Objective, examples: Sequence[TokenizedExample], ids: Sequence[int], layout: str,
                  pad_token_id: int, max_tokens: int) -> list[Batch]:
    """The batches that score the examples `ids` of one micro-batch: forward groups of at most `max_tokens` tokens
    (:func:`forward_groups`), or, for an objective that pairs each example with others of its micro-batch (KTO's KL
    term: ``objective.pair_examples``), the paired micro-batch whole."""
    pair = getattr(objective, "pair_examples", None)
    if pair is not None:
        return [collate(pair([examples[i] for i in ids]), ids, layout=layout, pad_token_id=pad_token_id)]
    return [collate([examples[i] for i in group], group, layout=layout, pad_token_id=pad_token_id)
            for group in forward_groups(ids, examples, max_tokens)]


def _metric_names(objective) -> list[str]:
    if hasattr(objective, "metric_names"):
        return list(objective.metric_names)
    if objective.num_responses == 1:
        return ["loss"]
    return ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected"]


@dataclass
class Engine:
    """The policy as the engine prepared it, its optimizer and schedule, and the step the run continues from."""

    accelerator: Accelerator
    model: nn.Module  # the Hugging Face (or PEFT) model inside `scorer`: what checkpoints save
    scorer: nn.Module  # Scorer wrapped by the engine: forward(batch) -> log-probs
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    plan: Plan
    step: int
    data_order: dict
    identity: dict | None = None  # run_identity: a resume must continue the same run
    resumed_from: Path | None = None  # the checkpoint the run continues from
    moving_reference: MovingReference | None = None  # TR-DPO: moved after steps, saved with checkpoints


def prepare(model: nn.Module, num_examples: int, config: TrainConfig, accelerator: Accelerator, *,
            chunked: bool = True, reference_state: ReferenceState | None = None, identity: dict | None = None,
            log=print) -> Engine:
    """Wrap `model` in a Scorer, hand it and its optimizer to the engine, and restore `--resume` state.

    A checkpoint's weights are loaded before the engine shards the model and its optimizer state after,
    so resuming works the same under every engine that can save optimizer state. A checkpoint of another
    run (`identity`) or past the planned steps is refused; metrics logged after it are dropped.
    """
    check_engine(accelerator)
    plan = make_plan(num_examples, config, accelerator.num_processes)
    data_order = {"examples": num_examples, "global_batch": plan.global_batch, "seed": config.seed}
    model.train()
    disable_dropout(model)
    checkpoint = latest_checkpoint(config.output_dir, log=log) if config.resume else None
    if config.resume and checkpoint is None:
        log(f"--resume: no checkpoint in {config.output_dir}; starting from scratch")
        if accelerator.is_main_process:
            truncate_metrics(config.output_dir, 0)  # rows of a run killed before its first checkpoint
    if checkpoint is not None:
        check_resumable(checkpoint, data_order, engine_name(accelerator), identity, accelerator.num_processes)
        saved_step = checkpoint_step(checkpoint)
        if saved_step > plan.total_steps:
            raise ConfigError(f"--resume: {checkpoint} is at step {saved_step}, past the {plan.total_steps} steps of "
                              "this run (--max-steps/--epochs); raise them to train on, or start a new --output")
        if engine_name(accelerator) != "zero3":  # ZeRO-3 loaded the model in partitions: its checkpoint restores them
            load_model_weights(model, checkpoint)
    configure_deepspeed(accelerator, config.batch_size, config.max_grad_norm)
    optimizer = make_optimizer(model, config)
    scorer, optimizer = accelerator.prepare(Scorer(model, chunked=chunked, reference_state=reference_state), optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(unwrap_optimizer(optimizer),
                                                  lambda s: lr_factor(s, config, plan.total_steps))
    step = 0
    if checkpoint is not None:
        step = load_trainer_state(checkpoint, scorer, unwrap_optimizer(optimizer), scheduler,
                                  sharded=shards_parameters(accelerator))
        if accelerator.is_main_process:
            dropped = truncate_metrics(config.output_dir, step)
            log(f"resumed from {checkpoint} at step {step}" + (f" ({dropped} metrics rows after it dropped)"
                                                                 if dropped else ""))
        accelerator.wait_for_everyone()
    return Engine(accelerator, model, scorer, optimizer, scheduler, plan, step, data_order, identity, checkpoint)


def train(
    engine: Engine,
    tokenizer: PreTrainedTokenizerBase,
    objective: Objective,
    train_examples: Sequence[TokenizedExample],
    eval_examples: Sequence[TokenizedExample] | None,
    config: TrainConfig,
    eval_objective: Objective | None = None,
    tracking: Tracking | None = None,
) -> dict[str, float]:
    """Run the training loop described in the module docstring; return the last evaluation's metrics.

    `eval_objective` scores the evaluation set (default: `objective`); it differs when reference log-probs
    are precomputed, since the evaluation examples have their own table. `tracking` gets every metrics row and,
    after each evaluation, logs its samples table.
    """
    accelerator, plan = engine.accelerator, engine.plan
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    log = MetricsLogger(config.output_dir, enabled=accelerator.is_main_process, tracking=tracking)
    log.print(_run_summary(engine, config, len(train_examples)))
    # Under FSDP2 and ZeRO-3 every forward pass is a collective: all processes must run the same number, so
    # each micro-batch is one pass there (forward groups would differ between processes).
    budget = 0 if shards_parameters(accelerator) else forward_tokens(config, accelerator.device)
    step = engine.step
    eval_metrics: dict[str, float] = {}
    last_save = time.monotonic()
    stop = StopRequests(log.print)
    early = EarlyStopping.restored(config.early_stopping_patience, engine.resumed_from)
    bar = tqdm(total=plan.total_steps, initial=step, desc="train", disable=not accelerator.is_main_process)
    with stop:
        while step < plan.total_steps and not early.stopped:
            refresh_threads(log.print)  # follows other processes' load (dpokit.runtime.threads); cheap, every ~15 s
            started = time.perf_counter()
            indices = step_indices(step, plan, len(train_examples), config.seed)
            batches = process_batches(engine, objective, train_examples, indices, config, pad, budget)
            sums = train_step(engine, objective, batches, step, config.max_grad_norm)
            step += 1
            bar.update(1)
            if engine.moving_reference is not None:
                engine.moving_reference.after_step(step)  # before this step's eval and checkpoint

            if step % config.log_every == 0 or step == plan.total_steps:
                row = train_row(engine, sums, step, time.perf_counter() - started,
                                [train_examples[i] for i in indices])
                log.write("train", step, row)
                bar.set_postfix({k: f"{row[k]:.4g}" for k in ("loss", "rewards/accuracies") if k in row})
            last = step == plan.total_steps
            if eval_examples and ((config.eval_every and step % config.eval_every == 0) or last):
                eval_metrics = evaluate(engine.scorer, eval_objective or objective, eval_examples, config,
                                        accelerator, pad)
                log.write("eval", step, eval_metrics)
                if tracking is not None:
                    tracking.log_samples(step)
                log.print(f"eval @ step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()))
                if early.update(step, eval_metrics["loss"]) and not last:
                    log.print(early.message(step))
                    last = early.stopped = True  # the final model is this step's
            stopping, due = _stop_or_save_due(accelerator, stop, config, last_save)
            if stopping or due or last or (config.save_every and step % config.save_every == 0):
                path = save_checkpoint(config.output_dir, step, engine, tokenizer,
                                       {"config": config_dict(config), "metrics": eval_metrics,
                                        "data_order": engine.data_order, "identity": engine.identity,
                                        "early_stopping": early.state()})
                last_save = time.monotonic()
                if config.keep_checkpoints and accelerator.is_main_process:
                    prune_checkpoints(config.output_dir, config.keep_checkpoints)
                if stopping:
                    bar.close()
                    log.close()
                    raise Interrupted(stop.signal or "a signal to another process", step, path)
    bar.close()
    log.close()
    return eval_metrics


def _run_summary(engine: Engine, config: TrainConfig, num_examples: int) -> str:
    """The log line that opens a run: steps, engine, the global batch and how it is made up, the epoch."""
    accelerator, plan = engine.accelerator, engine.plan
    return (f"training {plan.total_steps} steps ({engine_name(accelerator)}): global batch {plan.global_batch} "
            f"({config.batch_size} x {config.grad_accum} accumulation x {accelerator.num_processes} processes), "
            f"{plan.steps_per_epoch} steps per epoch, {num_examples % plan.global_batch} examples "
            "left out of each epoch's order (a different few each epoch)")


def process_batches(engine: Engine, objective: Objective, examples: Sequence[TokenizedExample],
                    indices: Sequence[int], config: TrainConfig, pad_token_id: int, max_tokens: int) -> list[Batch]:
    """This process's batches of the global batch `indices`, on its device: its `config.batch_size` examples of
    each of the `config.grad_accum` micro-batches, as :func:`micro_batches` groups them."""
    accelerator = engine.accelerator
    micro = [indices[(k * accelerator.num_processes + accelerator.process_index) * config.batch_size:]
             [: config.batch_size] for k in range(config.grad_accum)]
    return [batch.to(accelerator.device) for ids in micro
            for batch in micro_batches(objective, examples, ids, config.layout, pad_token_id, max_tokens)]


@dataclass
class StepSums:
    """What one optimizer step measured on this process: metric sums and counts (not yet reduced across
    processes), the divisor of the whole global batch, the gradient norm and the learning rate the step used."""

    metric_sums: dict[str, torch.Tensor]
    metric_counts: dict[str, torch.Tensor]
    divisor: torch.Tensor
    grad_norm: torch.Tensor
    lr: float


def train_step(engine: Engine, objective: Objective, batches: Sequence[Batch], step: int,
               max_grad_norm: float) -> StepSums:
    """One optimizer step of global step `step` (0-based) from this process's `batches`: forward and backward of
    each, gradient clipping (0 = none), then the optimizer and the learning-rate schedule.

    Raises TrainingError, before updating the weights, when the gradient norm is not finite.
    """
    accelerator, scorer = engine.accelerator, engine.scorer
    divisor = accelerator.reduce(torch.tensor(float(sum(objective.divisor(b) for b in batches)),
                                              dtype=torch.float64, device=accelerator.device), reduction="sum")
    # The engines average gradients over processes: scale so that the update is d(global mean loss).
    scale = accelerator.num_processes / divisor.float()
    metric_sums: dict[str, torch.Tensor] = {}
    metric_counts: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(batches):
        with micro_step(accelerator, scorer, last=i == len(batches) - 1):
            with accelerator.autocast():
                result = objective(scorer, batch)
            accelerator.backward(result.loss_sum * scale)
        for k, v in result.metric_sums.items():
            metric_sums[k] = metric_sums.get(k, 0) + v.double()
        for k, v in result.metric_counts.items():
            metric_counts[k] = metric_counts.get(k, 0) + v.double()
    # all parameters, read now (FSDP2 swaps sharded and unsharded ones); DeepSpeed clipped and stepped in backward
    max_norm = max_grad_norm if max_grad_norm > 0 else float("inf")
    grad_norm = accelerator.clip_grad_norm_(scorer.parameters(), max_norm)
    grad_norm = torch.as_tensor(float("nan") if grad_norm is None else grad_norm, dtype=torch.float32)
    if not torch.isfinite(grad_norm):  # one sync per step; an update with NaN/inf would ruin the weights
        raise TrainingError(
            f"step {step + 1}: the gradient norm is {grad_norm.item()} (loss "
            f"{(metric_sums['loss'] / divisor).item():.4g} on this process); "
            + ("DeepSpeed has already applied this update. " if engine_name(accelerator).startswith("zero")
               else "nothing was updated. ")
            + "Lower --lr, or use --dtype float32 if this ran in bfloat16; checkpoints so far are intact"
        )
    lr = engine.scheduler.get_last_lr()[0]  # the rate this step used (after scheduler.step() it is the next one's)
    engine.optimizer.step()
    engine.scheduler.step()
    engine.optimizer.zero_grad(set_to_none=True)
    return StepSums(metric_sums, metric_counts, divisor, grad_norm, lr)


def train_row(engine: Engine, sums: StepSums, step: int, seconds: float,
              examples: Sequence[TokenizedExample]) -> dict[str, float]:
    """The metrics.jsonl row of step `step` (1-based; it took `seconds` on the global batch `examples`): the
    metrics reduced across processes, then the gradient norm, learning rate, throughput and epoch."""
    keys, own = sorted(sums.metric_sums), sorted(sums.metric_counts)
    totals = engine.accelerator.reduce(torch.stack([sums.metric_sums[k] for k in keys] +
                                                   [sums.metric_counts[k] for k in own]), reduction="sum")
    count = dict(zip(own, totals[len(keys):]))
    row = {k: _mean(totals[i], count.get(k, sums.divisor)) for i, k in enumerate(keys)}
    row.update({"grad_norm": sums.grad_norm.item(), "lr": sums.lr,
                "tokens_per_second": _sequence_tokens(examples) / seconds, "seconds_per_step": seconds,
                "epoch": step / engine.plan.steps_per_epoch})
    return row


def _stop_or_save_due(accelerator: Accelerator, stop: StopRequests, config: TrainConfig,
                      last_save: float) -> tuple[bool, bool]:
    """One collective: did any process get SIGINT/SIGTERM, and is the time-based checkpoint due (main's clock)?"""
    due = config.save_every_minutes > 0 and time.monotonic() - last_save >= 60 * config.save_every_minutes
    flags = torch.tensor([float(stop.signal is not None), float(due)], device=accelerator.device)
    stopping, due = (accelerator.reduce(flags, reduction="sum") > 0).tolist()
    return stopping, due


def config_dict(config: TrainConfig) -> dict:
    """The config as a JSON-serialisable dict (stored with checkpoints)."""
    return json.loads(json.dumps(vars(config), default=str))
