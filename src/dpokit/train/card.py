"""The model card of a run's final model: OUTPUT/final/README.md, built with huggingface_hub's ModelCard.

It says what the model is (base model, full model or peft adapter), what it was trained on (data set names or
files), how (stage, loss and its hyperparameters, the optimisation, steps and tokens or examples seen), how well
(the last training metrics and the held-out ones), with which dpokit and torch, and how to load and sample it (a
reward model's card: the Bradley–Terry loss with its margins and centering, and how to score with it). Its
YAML metadata (``library_name``, ``tags``, ``base_model``, ``datasets``) is what the Hub reads; the numbers are also
under the metadata key ``dpokit``, so that ``ModelCard.load(path).data.dpokit`` gives them back.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

from dpokit.config import TrainConfig
from dpokit.config.loss import LossOptions
from dpokit.config.options import options_of
from dpokit.models.lora import adapter_base

CARD = "README.md"
REWARD_LOSS = "bradley_terry"  # the loss a `dpokit reward` card names
# what a metrics.jsonl row holds besides the metrics of the model itself
_BOOKKEEPING = {"split", "step", "lr", "tokens_per_second", "seconds_per_step", "epoch", "grad_norm"}


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _hub_id(name: str | None) -> bool:
    """Whether `name` reads as a Hub repository id rather than a local path (only those go into the metadata)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not name or Path(name).exists() or name.startswith((".", "/", "~")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def last_train_metrics(metrics_file: str | Path) -> dict[str, float]:
    """The metrics of the last logged training step in OUTPUT/metrics.jsonl (empty if there is none)."""
    path = Path(metrics_file)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    rows = [row for row in rows if row.get("split") == "train"]
    return rows[-1] if rows else {}


def _loss_options(config: TrainConfig, stage: str) -> dict:
    """The loss and its options: a reward model's Bradley–Terry loss with its margin column and reward centering,
    or the loss options a dpo or sft run takes."""
    if stage == "reward":
        return {"loss": REWARD_LOSS} | {name: getattr(config, name) for name in ("margin_column",
                                                                              "center_rewards_coefficient")
                                        if getattr(config, name) is not None}
    return {f.name: getattr(config, f.name) for f in options_of(LossOptions, "dpo" if stage != "sft" else "sft")
            if getattr(config, f.name) not in (None, False)}


def _hyperparameters(config: TrainConfig, stage: str) -> dict:
    loss = _loss_options(config, stage)
    optim = {name: getattr(config, name) for name in ("lr", "optimizer", "schedule", "warmup_steps", "warmup_ratio",
                                                      "batch_size", "grad_accum", "weight_decay", "max_grad_norm",
                                                      "max_length", "max_prompt_length", "dtype", "seed")
             if getattr(config, name) is not None}
    if config.lora_r is not None:
        optim |= {name: getattr(config, name) for name in ("lora_r", "lora_alpha", "lora_dropout",
                                                           "lora_target_modules", "lora_modules_to_save",
                                                           "use_dora", "use_rslora")
                  if getattr(config, name) not in (None, False)}
        optim["lora_alpha"] = config.lora_alpha if config.lora_alpha is not None else 2 * config.lora_r
    plain = lambda values: {k: int(v) if type(v) is not bool and isinstance(v, int) else v  # noqa: E731
                            for k, v in values.items()}  # a Default is an int to YAML
    return {"loss": plain(loss), "training": plain(optim)}


def _table(values: dict) -> str:
    if not values:
        return "(none)\n"
    rows = "".join(f"| `{k}` | {v:.6g} |\n" if isinstance(v, float) else f"| `{k}` | {v} |\n"
                   for k, v in values.items())
    return "| | |\n|---|---|\n" + rows


def _reward_usage(where: str, adapter: bool) -> str:
    auto = "AutoPeftModelForSequenceClassification" if adapter else "AutoModelForSequenceClassification"
    code = (f"from {'peft' if adapter else 'transformers'} import {auto}\nfrom transformers import AutoTokenizer\n\n"
            f'model = {auto}.from_pretrained("{where}")\ntokenizer = AutoTokenizer.from_pretrained("{where}")\n'
            'inputs = tokenizer("Write a short review of a film. A fine film.", return_tensors="pt")\n'
            "print(model(**inputs).logits[0, 0].item())  # the reward\n")
    return (f"```bash\ndpokit score --model {where} --data responses.jsonl --output rewards.jsonl\n```\n\n"
            f"```python\n{code}```\n\nAs a judge: `reward:{where}` (e.g. `dpokit winrate --judge reward:{where}`).\n")


def _usage(config: TrainConfig, where: str, adapter: bool) -> str:
    generate = f'dpokit generate --model {where} --prompt "Write a short review of a film."'
    if adapter:
        code = (f"from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
                f'model = AutoPeftModelForCausalLM.from_pretrained("{where}")\n'
                f'tokenizer = AutoTokenizer.from_pretrained("{where}")\n')
    else:
        code = (f"from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f'model = AutoModelForCausalLM.from_pretrained("{where}")\n'
                f'tokenizer = AutoTokenizer.from_pretrained("{where}")\n')
    code += ('inputs = tokenizer("Write a short review of a film.", return_tensors="pt")\n'
             "output = model.generate(**inputs, max_new_tokens=64, do_sample=True, top_p=0.95)\n"
             "print(tokenizer.decode(output[0], skip_special_tokens=True))\n")
    merge = (f"\nFold the adapter into its base model with `dpokit merge --adapter {where} --output merged`.\n"
             if adapter else "")
    return f"```bash\n{generate}\n```\n\n```python\n{code}```\n{merge}"


def model_card(config: TrainConfig, stage: str, *, steps: int, examples: int, train_metrics: dict,
               eval_metrics: dict, tokens: int | None = None):
    """The ModelCard of a run's final model (`stage`: "dpo", "kto", "sft" or "reward"; `examples`: training
    examples seen, `tokens` when the run counts them)."""
    from huggingface_hub import ModelCard, ModelCardData

    adapter = config.uses_lora
    base = adapter_base(config.model) if config.lora_r is None and adapter else config.model
    losses = [REWARD_LOSS] if stage == "reward" else config.loss.split(",") if stage != "sft" else ["sft"]
    data = [d for d in (config.data, config.eval_data) if d]
    train_metrics = {k: v for k, v in train_metrics.items() if k not in _BOOKKEEPING}
    seen = {"steps": steps, "examples": examples} | ({"tokens": tokens} if tokens is not None else {})
    record = {"stage": stage, "base_model": base, "data": config.data, "eval_data": config.eval_data,
              **seen, **_hyperparameters(config, stage), "metrics": {"train": train_metrics, "eval": eval_metrics},
              "versions": {"dpokit": _version("dpokit"), "torch": _version("torch")}}
    kind = "dpo" if stage in ("dpo", "kto") else stage
    tags = ["reward-model", "dpokit"] if stage == "reward" else [kind, *losses, "dpokit"]
    card_data = ModelCardData(
        base_model=base if _hub_id(base) else None, library_name="peft" if adapter else "transformers",
        datasets=[d for d in data if _hub_id(d)] or None,
        pipeline_tag="text-classification" if stage == "reward" else "text-generation",
        tags=list(dict.fromkeys(tags + (["lora"] if adapter else []))), dpokit=record)
    where = config.push_to_hub or str(config.output_dir / "final")
    what = "a LoRA adapter (peft)" + (" with DoRA" if config.use_dora else "") if adapter else "a full model"
    how = (f"trained from `{base}` as a Bradley–Terry reward model (a one-output sequence classifier)"
           if stage == "reward" else f"fine-tuned from `{base}` with {kind.upper()}")
    body = (f"# {config.push_to_hub or config.output_dir.name}\n\n"
            f"{what[0].upper() + what[1:]} {how} (loss {', '.join(losses)}) by "
            f"[dpokit](https://pypi.org/project/dpokit/).\n\n"
            f"## Training\n\n- data: {', '.join(f'`{d}`' for d in data)}\n"
            f"- {steps} optimizer steps, {examples} training examples seen"
            + (f", {tokens} tokens" if tokens is not None else "") + "\n"
            f"- dpokit {record['versions']['dpokit']}, torch {record['versions']['torch']}\n\n"
            f"### Loss\n\n{_table(record['loss'])}\n### Optimisation\n\n{_table(record['training'])}\n"
            f"## Metrics\n\nLast training step:\n\n{_table(train_metrics)}\n"
            f"Held-out{' (' + Path(config.eval_data).name + ')' if config.eval_data else ''}:\n\n"
            f"{_table(eval_metrics) if eval_metrics else '(no held-out data)' + chr(10)}\n"
            f"## Use\n\n{_reward_usage(where, adapter) if stage == 'reward' else _usage(config, where, adapter)}")
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}")


def write_model_card(directory: str | Path, config: TrainConfig, stage: str, *, steps: int, processes: int,
                     eval_metrics: dict) -> Path:
    """Write DIRECTORY/README.md: the card of the final model saved there (it replaces peft's template card).
    The training metrics are the last logged step's in OUTPUT/metrics.jsonl."""
    train_metrics = last_train_metrics(config.output_dir / "metrics.jsonl")
    examples = steps * config.batch_size * config.grad_accum * processes
    tokens = train_metrics.get("tokens_seen")
    card = model_card(config, stage, steps=steps, examples=examples, train_metrics=train_metrics,
                      eval_metrics=eval_metrics, tokens=int(tokens) if tokens is not None else None)
    path = Path(directory) / CARD
    card.save(path)
    return path
