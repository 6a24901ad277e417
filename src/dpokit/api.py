"""The Python API: each stage wires data, tokenisation, models and the trainer. The CLI is a thin face over it.

>>> from dpokit import TrainConfig, train_dpo
>>> train_dpo(TrainConfig(model="sft-model", data="pairs.jsonl", output="runs/dpo", beta=0.1))
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType
from transformers import PreTrainedTokenizerBase

from dpokit.models.attention import choose_attention, set_attention
from dpokit.train.checkpoint import run_identity, save_final
from dpokit.config import Default, TrainConfig
from dpokit.runtime.memory import malloc_note, return_freed_blocks
from dpokit.data import ColumnMap, load_completions, load_preferences, load_unpaired, split_eval
from dpokit.data.checks import glued_boundary_warning
from dpokit.train.engine import (ReferenceState, Scorer, check_engine, engine_name, engine_on_cpu, place_reference,
                           shards_parameters)
from dpokit.errors import ConfigError
from dpokit.eval.generation import Sample, generate, sample, sample_ids  # noqa: F401  (the API's names, kept here)
from dpokit.models.logprobs import check_layout
from dpokit.models.lora import trained_adapter_weight
from dpokit.data.validation import check_data_spec, check_model_spec, check_train_inputs
from dpokit.models.loading import load_model, load_tokenizer, model_max_positions
from dpokit.train.policy import load_policy
from dpokit.train.moving_reference import MovingReference, check_sync_engine
from dpokit.losses.dispatch import REFERENCE_FREE_LOSSES, LossConfig
from dpokit.losses.objective import DPOObjective, KTOObjective, SFTObjective
from dpokit.train.reference import (CachedReference, ModelReference, PolicyReference, cached_reference_logps,
                              weights_digest)
from dpokit.runtime.threads import apply_threads, model_width
from dpokit.data.tokenize import TokenizeConfig, TokenizedExample, tokenize_examples
from dpokit.train.rundir import claim_output
from dpokit.train.loop import Engine, config_dict, make_plan, prepare, schedule_warnings, train
from dpokit.train.loop import evaluate as evaluate_objective

def _columns(config: TrainConfig) -> ColumnMap:
    return ColumnMap(
        prompt=config.prompt_column, chosen=config.chosen_column, rejected=config.rejected_column,
        responses=config.responses_column, scores=config.scores_column, completion=config.completion_column,
    )


def tokenize_config(config: TrainConfig) -> TokenizeConfig:
    """The tokenisation settings of a training config."""
    return TokenizeConfig(config.max_length, config.max_prompt_length, config.truncation, config.on_filtered,
                          config.apply_chat_template)


@dataclass
class PreparedData:
    """Tokenised training and evaluation examples: lists, or with --streaming lazy sequences over the shards
    on disk (dpokit.data.sharded.ShardedExamples)."""

    train: Sequence[TokenizedExample]
    eval: Sequence[TokenizedExample]
    # unpaired data (stage "kto"): whether each example's completion is desirable, in the examples' order
    train_labels: list[bool] | None = None
    eval_labels: list[bool] | None = None


def kept_labels(records: Sequence, examples: Sequence[TokenizedExample]) -> list[bool]:
    """The labels of the records that tokenisation kept: `examples` are those records, in order, less the
    filtered ones, and each keeps its record's (unique) source."""
    labels, j = [], 0
    for example in examples:
        while records[j].source != example.source:
            j += 1
        labels.append(records[j].label)
        j += 1
    return labels


def prepare_data(config: TrainConfig, stage: str, tokenizer: PreTrainedTokenizerBase, log: Callable[[str], None] = print,
                 *, cache_dir: str | os.PathLike | None = None, use_cache: bool | None = None) -> PreparedData:
    """Load, validate, split and tokenise the data of `config` for `stage` ("dpo", "sft", or "kto": unpaired data,
    whose labels come back with the examples and which is never cached), reporting counts.

    The tokenised examples are cached on disk (see dpokit.data.cache) under a key of the raw data, tokenizer and
    every setting that decides the token ids: a later call with the same inputs reads them back instead of
    loading and tokenising again, and logs the same lines. `cache_dir` defaults to ``config.data_cache_dir``,
    else ``$DPOKIT_CACHE`` or ``~/.cache/dpokit/tokenized``; `use_cache` defaults to ``config.data_cache``.
    Only the process with LOCAL_RANK 0 writes entries. With ``config.streaming`` nothing is held in memory:
    see dpokit.data.streaming.
    """
    from dpokit.data.cache import open_cache
    from dpokit.data.tokenize import plain_text_warning, release_freed_memory

    settings = tokenize_config(config)
    if use_cache is None:
        use_cache = config.data_cache and stage != "kto"  # the cache does not keep labels
    if cache_dir is None:
        cache_dir = config.data_cache_dir
    if config.streaming:
        from dpokit.data.streaming import prepare_streamed

        return PreparedData(*prepare_streamed(config, stage, tokenizer, settings, _columns(config), log,
                                              cache_dir=cache_dir, use_cache=use_cache))
    cache = open_cache(config, stage, tokenizer, settings, _columns(config), cache_dir=cache_dir, log=log) \
        if use_cache else None
    if cache is not None:
        cached = cache.load(log)
        if cached is not None:
            for line in cached.log:
                log(line)
            log(f"tokenised data: reusing {cached.path}")
            return PreparedData(cached.examples["train"], cached.examples.get("eval", []))
    writer = cache.writer(log) if cache is not None and int(os.environ.get("LOCAL_RANK", "0") or 0) == 0 else None
    lines: list[str] = []

    def say(line: str) -> None:
        lines.append(line)
        log(line)

    try:
        load = {"dpo": load_preferences, "sft": load_completions, "kto": load_unpaired}[stage]
        records, report = load(config.data, format=config.format, columns=_columns(config), split=config.split)
        say(f"data: {len(records)} examples from {config.data} ({report.format} format, {report.rows} rows"
            + "".join(f"; {n} {reason}" for reason, n in report.counts.items()) + ")")
        eval_records: Sequence = []
        if config.eval_data:
            eval_records, eval_report = load(config.eval_data, format=config.format, columns=_columns(config),
                                             split=config.eval_split)
            say(f"eval data: {len(eval_records)} examples from {config.eval_data}")
        elif config.eval_fraction:
            records, eval_records = split_eval(records, config.eval_fraction, config.seed)
            say(f"eval data: {len(eval_records)} examples held out of {config.data} (seed {config.seed})")
        warning = plain_text_warning([*records, *eval_records], tokenizer, settings)
        if warning:
            say(warning)
        glued = None if config.apply_chat_template else glued_boundary_warning([*records, *eval_records])
        if glued:
            say(glued)
        train_examples, train_report = tokenize_examples(records, tokenizer, settings, description="tokenising",
                                                         sink=writer and writer.sink("train"))
        labels = kept_labels(records, train_examples) if stage == "kto" else None
        eval_labels = None
        del records
        say(f"tokenised training data: {train_report.summary()}")
        eval_examples: list[TokenizedExample] = []
        reports = {"train": train_report}
        if eval_records:
            eval_examples, reports["eval"] = tokenize_examples(eval_records, tokenizer, settings,
                                                               description="tokenising eval",
                                                               sink=writer and writer.sink("eval"))
            say(f"tokenised eval data: {reports['eval'].summary()}")
            eval_labels = kept_labels(eval_records, eval_examples) if stage == "kto" else None
        del eval_records
        if writer is not None:
            entry = writer.commit(cache.inputs, lines, reports)
            log(f"tokenised data: cached in {entry}" if entry else f"tokenised data: not cached ({writer.error})")
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    release_freed_memory()  # the raw records and the tokenizer's output, freed
    if labels is not None:
        say(f"labels: {sum(labels)} desirable and {len(labels) - sum(labels)} undesirable training examples")
    return PreparedData(train_examples, eval_examples, labels, eval_labels)


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
    accelerator = Accelerator(mixed_precision="bf16" if config.dtype == "bfloat16" else "no", cpu=cpu_only)
    if cpu_only:
        engine_on_cpu(accelerator)
    return accelerator


def _loss_config(config: TrainConfig) -> LossConfig:
    return config.loss_config()


@dataclass
class _Run:
    """What both training stages start from."""

    accelerator: Accelerator
    log: Callable[[str], None]
    tokenizer: PreTrainedTokenizerBase
    data: PreparedData
    model: torch.nn.Module
    reference_state: ReferenceState | None


def _start(config: TrainConfig, stage: str) -> _Run:
    """Accelerator, seed, tokenizer, tokenised data and policy (with its layout checked) for `stage`."""
    accelerator = make_accelerator(config)
    check_engine(accelerator)
    if stage == "dpo" and config.sync_ref_every:
        check_sync_engine(accelerator)
    if shards_parameters(accelerator) and (config.load_in_4bit or config.load_in_8bit):
        raise ConfigError(f"--load-in-4bit/8bit under {engine_name(accelerator)} is not supported: quantized weights "
                          "are not sharded; launch QLoRA with DDP (configs/accelerate/ddp.yaml) or one process")
    torch.manual_seed(config.seed)
    log = print if accelerator.is_main_process else (lambda *_: None)
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code, gguf_file=config.gguf_file)
    _fit_lengths(config, log)
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
    return _Run(accelerator, log, tokenizer, data, model, reference_state)


def _fit_lengths(config: TrainConfig, log: Callable[[str], None]) -> None:
    """--max-length against the model's maximum positions, read from its config (no weights loaded)."""
    positions = model_max_positions(config.model, trust_remote_code=config.trust_remote_code,
                                    gguf_file=config.gguf_file)
    note = config.fit_max_length(positions, config.model)
    if note:
        log(note)


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
    with _claim(config):
        return _train_dpo(config)


def _train_dpo(config: TrainConfig) -> dict[str, float]:
    loss = _loss_config(config)
    run = _start(config, "kto" if loss.unpaired else "dpo")
    chunked = config.logits == "chunked"
    start_digest = None
    if config.precompute_ref and not loss.reference_free and config.ref_model is None:
        # taken before a checkpoint's weights are loaded or the engine shards the model; a LoRA run's trained
        # adapter is left out, since its reference never uses it
        start_digest = weights_digest(run.model, skip=trained_adapter_weight if config.uses_lora else lambda n: False)
    engine = _prepare(run, config, chunked)
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
    return _run(run, engine, objective, config, eval_objective)


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
    with _claim(config):
        run = _start(config, stage)
        engine = _prepare(run, config, config.logits == "chunked")
        return _run(run, engine, objective, config, objective)


def _prepare(run: _Run, config: TrainConfig, chunked: bool) -> Engine:
    """The engine-wrapped policy, with the batch layout checked on it (every process takes part)."""
    identity = run_identity(config_dict(config), run.data.train, config.model)
    engine = prepare(run.model, len(run.data.train), config, run.accelerator, chunked=chunked,
                     reference_state=run.reference_state, identity=identity, log=run.log)
    config.layout = check_layout(engine.scorer, run.data.train, config.layout, run.tokenizer.pad_token_id,
                                 device=run.accelerator.device, max_length=config.max_length)
    return engine


def _run(run: _Run, engine: Engine, objective, config: TrainConfig, eval_objective) -> dict[str, float]:
    metrics = train(engine, run.tokenizer, objective, run.data.train, run.data.eval, config,
                    eval_objective=eval_objective)
    if config.save_final:
        final = save_final(config.output_dir / "final", engine, run.tokenizer,
                           lambda tmp: (tmp / "dpokit_metrics.json").write_text(json.dumps(metrics, indent=1)))
        run.log(f"saved the trained {'adapter' if config.uses_lora else 'model'} to {final}")
    run.accelerator.wait_for_everyone()
    return metrics


def evaluate(
    model: str,
    data: str,
    *,
    ref_model: str | None = None,
    loss: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    simpo_gamma: float | None = None,
    loss_weights: str | None = None,
    dpop_lambda: float | None = None,
    ld_alpha: float | None = None,
    use_weighting: bool = False,
    desirable_weight: float | None = None,
    undesirable_weight: float | None = None,
    batch_size: int = 8,
    max_length: int = Default(512),
    max_prompt_length: int = Default(256),
    truncation: str = "keep_end",
    format: str = "auto",
    dtype: str = "float32",
    layout: str = "packed",
    attention: str = "auto",
    on_filtered: str = "skip",
    apply_chat_template: bool = False,
    gguf_file: str | None = None,
    threads: int | None = None,
    log=print,
) -> dict[str, float]:
    """Preference loss, reward accuracy, margins and log-probs of `model` against `ref_model` on `data`.

    Nothing is trained. Without `ref_model` the evaluation is reference-free. With ``loss="kto"`` `data` is unpaired
    (prompt, completion, label) and the metrics are KTO's (dpokit.losses.objective.KTOObjective). `apply_chat_template` renders
    plain-text data with the chat template, as in training (TrainConfig.apply_chat_template). `gguf_file` loads
    `model` from that GGUF file in its directory. The default `max_length` is lowered to the model's maximum
    positions when it has fewer. `threads`: torch's CPU threads (default: dpokit.runtime.threads chooses). `attention`:
    the attention kernel, as TrainConfig.attention (``flex`` runs on CPU too here: evaluation needs no backward pass).
    """
    if ref_model is None and not reference_free and loss not in REFERENCE_FREE_LOSSES:
        raise ConfigError("evaluation needs --ref-model (or --reference-free)")
    check_model_spec("--model", model, gguf_file=gguf_file)
    if ref_model is not None:
        check_model_spec("--ref-model", ref_model)
    check_data_spec("--data", data)
    config = TrainConfig(model=model, data=data, output="-", loss=loss, beta=beta, label_smoothing=label_smoothing,
                         reference_free=reference_free, batch_size=batch_size, max_length=max_length,
                         max_prompt_length=max_prompt_length, truncation=truncation, format=format, dtype=dtype,
                         layout=layout, attention=attention, on_filtered=on_filtered,
                         apply_chat_template=apply_chat_template, gguf_file=gguf_file, ref_model=ref_model, simpo_gamma=simpo_gamma,
                         loss_weights=loss_weights, dpop_lambda=dpop_lambda, ld_alpha=ld_alpha,
                         use_weighting=use_weighting, desirable_weight=desirable_weight,
                         undesirable_weight=undesirable_weight)
    loss_config = _loss_config(config)
    accelerator = make_accelerator(config)
    tokenizer = load_tokenizer(model, gguf_file=gguf_file)
    _fit_lengths(config, log)
    data = prepare_data(config, "kto" if loss_config.unpaired else "dpo", tokenizer, log)
    examples = data.train
    policy = Scorer(load_model(model, dtype=dtype, gguf_file=gguf_file).to(accelerator.device))
    apply_threads(threads, width=model_width(policy.model), device=accelerator.device, log=log)
    attention = choose_attention(config.attention, accelerator.device, config.layout, training=False)
    set_attention(policy.model, attention)
    reference = None
    if not config.reference_free:  # simpo and orpo set it
        reference_model = load_model(ref_model, dtype=dtype).to(accelerator.device)
        set_attention(reference_model, attention)
        reference = ModelReference(reference_model)
    objective = KTOObjective(loss_config, reference, torch.tensor(data.train_labels)) if loss_config.unpaired \
        else DPOObjective(loss_config, reference)
    pad = tokenizer.pad_token_id
    metrics = evaluate_objective(policy, objective, examples, config, accelerator, pad)
    metrics["examples"] = len(examples)
    return metrics
