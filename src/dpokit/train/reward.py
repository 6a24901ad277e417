"""`dpokit reward`: a Bradley–Terry reward model trained through the one training loop (dpokit.train.loop).

The reward model is ``AutoModelForSequenceClassification`` with one output (dpokit.models.loading.load_reward_model:
a causal LM's trunk under a fresh score head, a reward model, or a LoRA adapter of one, its base quantized for
QLoRA). The data, its formats and caches, the engines, checkpoints, resume, the run directory, the trackers
(--report-to), the model card and --push-to-hub are dpo's; the engine-wrapped Scorer gives each sequence's reward
(dpokit.models.rewards) and the objective is dpokit.losses.objective.RewardObjective. The final model in
OUTPUT/final (with a reward model's card, dpokit.train.card) is a reward model directory (or its adapter) that
`dpokit score --model`, the ``reward:PATH`` judge and ``AutoModelForSequenceClassification`` load.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from dpokit.config.reward import RewardConfig
from dpokit.data.margins import example_margins, read_margins
from dpokit.data.validation import check_train_inputs
from dpokit.errors import ConfigError
from dpokit.losses.objective import RewardObjective
from dpokit.models.attention import choose_attention, set_attention
from dpokit.models.fused_lora import fuse_lora_linears
from dpokit.models.loading import load_reward_model, load_tokenizer
from dpokit.runtime.memory import malloc_note, return_freed_blocks
from dpokit.runtime.threads import apply_threads, model_width
from dpokit.train.engine import check_engine, engine_name, shards_parameters
from dpokit.train.policy import prepare_for_training
from dpokit.train.loop import make_plan, schedule_warnings, train
from dpokit.train.prepare import PreparedData, prepare_data
from dpokit.train.run import _claim, _prepare, _run, _Run, fit_lengths, make_accelerator


def _names(text: str | None) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()] if text else []


def add_reward_adapter(model: PreTrainedModel, config: RewardConfig) -> PreTrainedModel:
    """A fresh LoRA adapter on a reward model (peft's SEQ_CLS task: its score head is trained in full and saved
    with the adapter)."""
    from peft import LoraConfig, get_peft_model

    alpha = config.lora_alpha if config.lora_alpha is not None else 2 * config.lora_r
    variants = {name: True for name in ("use_dora", "use_rslora") if getattr(config, name, False)}
    lora = LoraConfig(r=config.lora_r, lora_alpha=alpha, lora_dropout=config.lora_dropout,
                      target_modules=_names(config.lora_target_modules) or "all-linear",
                      modules_to_save=["score", *_names(getattr(config, "lora_modules_to_save", None))],
                      task_type="SEQ_CLS", **variants)
    try:
        return get_peft_model(model, lora)
    except ValueError as error:
        raise ConfigError(f"cannot add a LoRA adapter to {type(model).__name__}: {error}") from None


def load_reward_policy(config: RewardConfig, device: torch.device | str, pad_token_id: int) -> PreTrainedModel:
    """The reward model to train: full, with a fresh LoRA adapter, or an adapter directory trained further (its
    base quantized for QLoRA), as dpokit.train.policy.load_policy assembles a policy."""
    bits = 4 if config.load_in_4bit else 8 if config.load_in_8bit else None
    dtype = config.dtype if config.uses_lora else "float32"  # full fine-tuning keeps float32 master weights
    model = load_reward_model(config.model, pad_token_id, dtype=dtype, trust_remote_code=config.trust_remote_code,
                              bits=bits, device=device, trainable_adapter=True, gguf_file=config.gguf_file)
    prepare_for_training(model, quantized=bits is not None, checkpointing=config.gradient_checkpointing)
    if config.lora_r is not None:
        model = add_reward_adapter(model, config)
    if config.uses_lora:
        fuse_lora_linears(model)
    return model if bits is not None else model.to(device)


def _start(given: RewardConfig) -> _Run:
    """Accelerator, seed, tokenizer, tokenised pairs and the reward model, with the lengths fitted to the model."""
    accelerator = make_accelerator(given)
    check_engine(accelerator)
    if shards_parameters(accelerator) and (given.load_in_4bit or given.load_in_8bit):
        raise ConfigError(f"--load-in-4bit/8bit under {engine_name(accelerator)} is not supported: quantized weights "
                          "are not sharded; launch QLoRA with DDP (configs/accelerate/ddp.yaml) or one process")
    torch.manual_seed(given.seed)  # also the fresh score head's initialisation
    log = print if accelerator.is_main_process else (lambda *_: None)
    tokenizer = load_tokenizer(given.model, trust_remote_code=given.trust_remote_code, gguf_file=given.gguf_file)
    resolved = fit_lengths(given, log)
    config = resolved.applied(given)
    data = prepare_data(config, "dpo", tokenizer, log)  # preference pairs, tokenised (and cached) as for dpo
    plan = make_plan(len(data.train), config, accelerator.num_processes)
    for line in schedule_warnings(plan, config, eval_examples=len(data.eval)):
        log(line)
    if accelerator.device.type == "cpu":
        log(malloc_note())
        if config.return_freed_memory and not return_freed_blocks():
            log("--return-freed-memory: not applied (not glibc's malloc, e.g. jemalloc preloaded, "
                "or MALLOC_MMAP_THRESHOLD_ is set)")
    model = load_reward_policy(config, accelerator.device, tokenizer.pad_token_id)
    set_attention(model, choose_attention(config.attention, accelerator.device, config.layout))
    apply_threads(config.threads, width=model_width(model), device=accelerator.device, log=log)
    return _Run(accelerator=accelerator, log=log, tokenizer=tokenizer, data=data, model=model,
                reference_state=None, config=config, resolved=resolved, stage="reward")


def objectives(config: RewardConfig, data: PreparedData) -> tuple[RewardObjective, RewardObjective | None]:
    """The training and evaluation objectives, each with the margins of its examples (--margin-column)."""
    def margins(spec: str, split: str, examples) -> torch.Tensor | None:
        if config.margin_column is None:
            return None
        table = read_margins(spec, config.margin_column, split)
        return torch.tensor(example_margins(table, [e.source for e in examples]), dtype=torch.float32)

    coefficient = config.center_rewards_coefficient
    train_objective = RewardObjective(margins(config.data, config.split, data.train), coefficient)
    if not data.eval:
        return train_objective, None
    spec, split = (config.eval_data, config.eval_split) if config.eval_data else (config.data, config.split)
    return train_objective, RewardObjective(margins(spec, split, data.eval), coefficient)


def train_reward(config: RewardConfig) -> dict[str, float]:
    """Train a reward model on `config.data`; returns the final evaluation metrics (loss, accuracy, margin,
    rewards/chosen, rewards/rejected on the held-out pairs). The trackers, the final model with its card and the
    Hub upload are dpo's (dpokit.train.run._run)."""
    check_train_inputs(config)
    config.check_hub()
    with _claim(config):
        run = _start(config)
        engine = _prepare(run, config, True)
        objective, eval_objective = objectives(run.config, run.data)
        return _run(run, engine, objective, eval_objective)
