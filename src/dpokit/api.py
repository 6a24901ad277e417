"""The Python API: each stage wires data, tokenisation, models and the trainer. The CLI is a thin face over it.

>>> from dpokit import TrainConfig, train_dpo
>>> train_dpo(TrainConfig(model="sft-model", data="pairs.jsonl", output="runs/dpo", beta=0.1))
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from dpokit.checkpoint import save_model_dir
from dpokit.config import TrainConfig
from dpokit.data import ColumnMap, load_completions, load_preferences, split_eval
from dpokit.errors import ConfigError
from dpokit.logprobs import check_layout
from dpokit.losses import LossConfig
from dpokit.objective import DPOObjective, SFTObjective
from dpokit.reference import CachedReference, ModelReference, cached_reference_logps, weights_digest
from dpokit.tokenize import TokenizeConfig, TokenizedExample, tokenize_examples
from dpokit.trainer import evaluate as evaluate_objective
from dpokit.trainer import train

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(path: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer; a missing pad token becomes the EOS token (pads are masked out anyway)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot load a tokenizer from {path!r}: {error}") from None
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"the tokenizer of {path!r} has no EOS token; dpokit appends EOS to responses")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str, *, dtype: str = "float32", trust_remote_code: bool = False) -> PreTrainedModel:
    """Load a causal LM in `dtype`, in eval mode (dropout off)."""
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot load a causal language model from {path!r}: {error}") from None
    return model.eval()


def _columns(config: TrainConfig) -> ColumnMap:
    return ColumnMap(
        prompt=config.prompt_column, chosen=config.chosen_column, rejected=config.rejected_column,
        responses=config.responses_column, scores=config.scores_column, completion=config.completion_column,
    )


def tokenize_config(config: TrainConfig) -> TokenizeConfig:
    """The tokenisation settings of a training config."""
    return TokenizeConfig(config.max_length, config.max_prompt_length, config.truncation, config.on_filtered)


@dataclass
class PreparedData:
    """Tokenised training and evaluation examples."""

    train: list[TokenizedExample]
    eval: list[TokenizedExample]


def prepare_data(config: TrainConfig, stage: str, tokenizer: PreTrainedTokenizerBase, log: Callable[[str], None] = print
                 ) -> PreparedData:
    """Load, validate, split and tokenise the data of `config` for `stage` ("dpo" or "sft"), reporting counts."""
    load = load_preferences if stage == "dpo" else load_completions
    records, report = load(config.data, format=config.format, columns=_columns(config), split=config.split)
    log(f"data: {len(records)} examples from {config.data} ({report.format} format, {report.rows} rows"
        + "".join(f"; {n} {reason}" for reason, n in report.counts.items()) + ")")
    eval_records: Sequence = []
    if config.eval_data:
        eval_records, eval_report = load(config.eval_data, format=config.format, columns=_columns(config),
                                         split=config.eval_split)
        log(f"eval data: {len(eval_records)} examples from {config.eval_data}")
    elif config.eval_fraction:
        records, eval_records = split_eval(records, config.eval_fraction, config.seed)
        log(f"eval data: {len(eval_records)} examples held out of {config.data} (seed {config.seed})")
    settings = tokenize_config(config)
    train_examples, train_report = tokenize_examples(records, tokenizer, settings, description="tokenising")
    log(f"tokenised training data: {train_report.summary()}")
    eval_examples: list[TokenizedExample] = []
    if eval_records:
        eval_examples, eval_report = tokenize_examples(eval_records, tokenizer, settings, description="tokenising eval")
        log(f"tokenised eval data: {eval_report.summary()}")
    return PreparedData(train_examples, eval_examples)


def make_accelerator(config: TrainConfig) -> Accelerator:
    """An Accelerator for `config`: its mixed precision, and gloo on CPU-only multi-process launches."""
    # Launched as several processes (torchrun / accelerate launch) on a machine without CUDA: accelerate
    # sets up gloo only when told to use the CPU; otherwise every process would train alone as "main".
    cpu_only = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    # accelerate keeps one process-wide state and refuses a second Accelerator with another mixed precision;
    # forget it (not the process group) so that e.g. a float32 SFT and a bfloat16 DPO run in one process.
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision="bf16" if config.dtype == "bfloat16" else "no", cpu=cpu_only)


def _loss_config(config: TrainConfig) -> LossConfig:
    return LossConfig(config.loss, config.beta, config.label_smoothing, config.reference_free, config.sft_weight)


@dataclass
class _Run:
    """What both training stages start from."""

    accelerator: Accelerator
    log: object
    tokenizer: object
    data: PreparedData
    model: torch.nn.Module


def _start(config: TrainConfig, stage: str) -> _Run:
    """Accelerator, seed, tokenizer, tokenised data and policy (with its layout checked) for `stage`."""
    accelerator = make_accelerator(config)
    torch.manual_seed(config.seed)
    log = print if accelerator.is_main_process else (lambda *_: None)
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    data = prepare_data(config, stage, tokenizer, log)
    model = load_model(config.model, trust_remote_code=config.trust_remote_code).to(accelerator.device)
    config.layout = check_layout(model, data.train, config.layout, tokenizer.pad_token_id)
    return _Run(accelerator, log, tokenizer, data, model)


def _references(config: TrainConfig, run: _Run, chunked: bool):
    """The reference for training and for evaluation: one resident frozen model, or two cached tables."""
    ref_dtype = config.ref_dtype or config.dtype
    if config.ref_model:
        ref_model = load_model(config.ref_model, dtype=ref_dtype, trust_remote_code=config.trust_remote_code)
    else:
        ref_model = copy.deepcopy(run.model).to(DTYPES[ref_dtype])
    ref_model = ref_model.eval().requires_grad_(False).to(run.accelerator.device)
    if not config.precompute_ref:
        reference = ModelReference(ref_model, chunked=chunked)
        return reference, reference
    cache = config.ref_cache_dir or str(config.output_dir / "ref_cache")
    kwargs = dict(batch_size=config.eval_batch_size or config.batch_size, layout=config.layout, chunked=chunked,
                  device=run.accelerator.device, weights=weights_digest(ref_model), log=run.log)
    train_table = cached_reference_logps(ref_model, run.tokenizer, run.data.train, cache, **kwargs)[0]
    eval_table = None
    if run.data.eval:
        eval_table = cached_reference_logps(ref_model, run.tokenizer, run.data.eval, cache,
                                            description="reference log-probs (eval)", **kwargs)[0]
    # ref_model goes out of scope here: it is not kept in memory during training
    return CachedReference(train_table), None if eval_table is None else CachedReference(eval_table)


def train_dpo(config: TrainConfig) -> dict[str, float]:
    """Fine-tune `config.model` with DPO on `config.data`; returns the final evaluation metrics."""
    run = _start(config, "dpo")
    loss = _loss_config(config)
    chunked = config.logits == "chunked"
    reference, eval_reference = (None, None) if loss.reference_free else _references(config, run, chunked)
    objective = DPOObjective(loss, reference, chunked=chunked, average_logps=config.average_logps)
    eval_objective = DPOObjective(loss, eval_reference, chunked=chunked, average_logps=config.average_logps) \
        if run.data.eval else None
    return _run(run, objective, config, eval_objective)


def train_sft(config: TrainConfig) -> dict[str, float]:
    """Supervised fine-tuning of `config.model` on completions (or the chosen responses of a preference set)."""
    run = _start(config, "sft")
    objective = SFTObjective(chunked=config.logits == "chunked")
    return _run(run, objective, config, objective)


def _run(run: _Run, objective, config: TrainConfig, eval_objective) -> dict[str, float]:
    metrics = train(run.model, run.tokenizer, objective, run.data.train, run.data.eval, config, run.accelerator,
                    eval_objective=eval_objective)
    if config.save_final and run.accelerator.is_main_process:
        final = save_model_dir(config.output_dir / "final", run.model, run.tokenizer,
                               lambda tmp: (tmp / "dpokit_metrics.json").write_text(json.dumps(metrics, indent=1)))
        print(f"saved the trained model to {final}")
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
    batch_size: int = 8,
    max_length: int = 512,
    max_prompt_length: int = 256,
    truncation: str = "keep_end",
    format: str = "auto",
    dtype: str = "float32",
    layout: str = "packed",
    on_filtered: str = "skip",
    log=print,
) -> dict[str, float]:
    """Preference loss, reward accuracy, margins and log-probs of `model` against `ref_model` on `data`.

    Nothing is trained. Without `ref_model` the evaluation is reference-free.
    """
    if ref_model is None and not reference_free:
        raise ConfigError("evaluation needs --ref-model (or --reference-free)")
    config = TrainConfig(model=model, data=data, output="-", loss=loss, beta=beta, label_smoothing=label_smoothing,
                         reference_free=reference_free, batch_size=batch_size, max_length=max_length,
                         max_prompt_length=max_prompt_length, truncation=truncation, format=format, dtype=dtype,
                         layout=layout, on_filtered=on_filtered)
    accelerator = make_accelerator(config)
    tokenizer = load_tokenizer(model)
    examples = prepare_data(config, "dpo", tokenizer, log).train
    policy = load_model(model, dtype=dtype).to(accelerator.device)
    reference = None
    if not reference_free:
        reference = ModelReference(load_model(ref_model, dtype=dtype).to(accelerator.device))
    objective = DPOObjective(_loss_config(config), reference)
    pad = tokenizer.pad_token_id
    metrics = evaluate_objective(policy, objective, examples, config, accelerator, pad)
    metrics["examples"] = len(examples)
    return metrics


@torch.no_grad()
def generate(
    model: str,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    num_samples: int = 1,
    seed: int = 0,
    batch_size: int = 16,
) -> list[list[str]]:
    """Sample `num_samples` continuations of each prompt (greedy when temperature is 0)."""
    tokenizer = load_tokenizer(model)
    policy = load_model(model)
    return sample(policy, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                  top_p=top_p, num_samples=num_samples, seed=seed, batch_size=batch_size)


@dataclass(frozen=True)
class Sample:
    """One sampled continuation: the prompt ids, the generated ids (through EOS if emitted), and its text."""

    prompt_ids: list[int]
    ids: list[int]
    text: str


@torch.no_grad()
def sample_ids(policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], *,
               max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0, num_samples: int = 1,
               seed: int = 0, batch_size: int = 16) -> list[list[Sample]]:
    """`num_samples` continuations of each prompt from an in-memory model, with their token ids.

    Batches are left-padded; each prompt is tokenised as in training; temperature 0 is greedy. `batch_size`
    counts sequences (prompts × samples).
    """
    if temperature < 0 or not 0 < top_p <= 1 or num_samples < 1 or max_new_tokens < 1:
        raise ConfigError("need temperature >= 0, 0 < top_p <= 1, num_samples >= 1 and max_new_tokens >= 1")
    torch.manual_seed(seed)
    policy.eval()
    policy.generation_config.max_length = None  # max_new_tokens decides; silences transformers' warning
    device = next(policy.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 \
        else dict(do_sample=False)
    flat = [p for p in prompts for _ in range(num_samples)]
    outputs: list[Sample] = []
    for i in range(0, len(flat), batch_size):
        encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] or [start] for p in flat[i : i + batch_size]]
        width = max(map(len, encoded))
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=device)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
        generated = policy.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                    pad_token_id=pad, eos_token_id=eos, **sampling)[:, width:].tolist()
        for prompt_ids, tokens in zip(encoded, generated):
            if eos in tokens:
                tokens = tokens[: tokens.index(eos) + 1]
            outputs.append(Sample(prompt_ids, tokens, tokenizer.decode(tokens, skip_special_tokens=True)))
    return [outputs[i * num_samples : (i + 1) * num_samples] for i in range(len(prompts))]


def sample(policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
           **options) -> list[list[str]]:
    """The texts of :func:`sample_ids` (same options)."""
    return [[s.text for s in group] for group in sample_ids(policy, tokenizer, prompts, **options)]
