"""Judges: score texts with a number, used to label preference pairs (higher = preferred).

A judge is a callable ``list[str] -> list[float]`` of full texts (prompt + continuation). Five kinds:

* :func:`vader_judge` - the VADER sentiment compound score in [-1, 1] (``vaderSentiment`` package),
  the stand-in for the sentiment classifier of the DPO paper's controlled-sentiment experiment;
  a text counts as positive when its score is above :data:`POSITIVE_THRESHOLD`;
* :func:`function_judge` - any Python callable ``str -> float``;
* :func:`classifier_judge` - a local Hugging Face sequence classifier: the probability of one label;
* :func:`reward_judge` - a local reward model (a one-output sequence classifier): its raw score;
* ``implicit:POLICY:REF[:BETA]`` - the implicit reward β·log π(y|x)/π_ref(y|x) of a DPO policy
  (dpokit.eval.scoring.ImplicitJudge).

:func:`load_judge` builds one from a string spec (for the CLI and config files).

A judge that scores a continuation *given its prompt* has a second form of call, a ``continuations(prompts,
continuations)`` method: the implicit reward is such a judge (called with full texts it can only score each text
as a response to an empty prompt, which also scores the prompt's tokens). Callers that hold the prompt and the
continuation apart use :func:`judge_continuations`, which gives every judge what it can use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from dpokit.errors import ConfigError

__all__ = [
    "Judge", "POSITIVE_THRESHOLD", "vader_judge", "function_judge", "classifier_judge", "reward_judge",
    "judge_continuations",
]

Judge = Callable[[list[str]], list[float]]

POSITIVE_THRESHOLD = 0.05
"""VADER compound score above which a text counts as positive (VADER's own convention)."""


def vader_judge() -> Judge:
    """A judge returning VADER's compound sentiment score in [-1, 1] for each text."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()  # loads the lexicon once

    def judge(texts: list[str]) -> list[float]:
        return [float(analyzer.polarity_scores(t)["compound"]) for t in texts]

    judge.__name__ = "vader"
    return judge


def function_judge(fn: Callable[[str], float]) -> Judge:
    """Wrap a per-text scoring function ``str -> float`` as a judge."""
    if not callable(fn):
        raise ConfigError(f"function_judge needs a callable str -> float, got {type(fn).__name__}")

    def judge(texts: list[str]) -> list[float]:
        return [float(fn(t)) for t in texts]

    judge.__name__ = getattr(fn, "__name__", "function")
    return judge


def _label_index(config, label: str) -> int:
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    label2id = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
    for name, idx in label2id.items():
        if name == label:
            return idx
    for idx, name in id2label.items():
        if name == label:
            return idx
    matches = {idx for idx, name in id2label.items() if name.lower() == label.lower()}
    matches |= {idx for name, idx in label2id.items() if name.lower() == label.lower()}
    if len(matches) == 1:
        return matches.pop()
    known = sorted(set(id2label.values()) | set(label2id))
    raise ConfigError(f"label {label!r} is not one of the classifier's labels: {', '.join(known) or '(none)'}")


def _load_sequence_classifier(model_path: str, kind: str, device: str, batch_size: int):
    """A local ``AutoModelForSequenceClassification`` and its tokenizer (padding set up), in eval mode on
    `device`, with the longest input both accept; errors name `kind` ("classifier judge", "reward judge")."""
    import os

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if not os.path.isdir(model_path):
        raise ConfigError(f"{kind}: {model_path!r} is not a local model directory")
    if batch_size < 1:
        raise ConfigError(f"{kind}: batch_size must be >= 1, got {batch_size}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(model_path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{kind}: cannot load a sequence classifier from {model_path!r}: {e}") from e
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"{kind}: the tokenizer in {model_path!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    max_len = min(int(tokenizer.model_max_length or 512), int(getattr(model.config, "max_position_embeddings", 512) or 512))
    return tokenizer, model.to(device).eval(), max_len


def _batched_logits(tokenizer, model, max_len: int, device: str, batch_size: int, texts: list[str]):
    """The classifier's float logits ``[len(texts), num_labels]``, `batch_size` texts at a time (padded)."""
    import torch

    chunks = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[i : i + batch_size]), return_tensors="pt", padding=True,
                            truncation=True, max_length=max_len).to(device)
            chunks.append(model(**enc).logits.float().cpu())
    return torch.cat(chunks) if chunks else torch.zeros(0, int(model.config.num_labels))


def classifier_judge(model_path: str, label: str, device: str = "cpu", batch_size: int = 32) -> Judge:
    """A judge returning the probability of ``label`` under a local sequence classifier.

    ``model_path`` is a local directory holding an ``AutoModelForSequenceClassification`` and its
    tokenizer (nothing is downloaded; ``trust_remote_code`` is never set). ``label`` is looked up
    in ``config.label2id`` / ``config.id2label`` (exact, then case-insensitive); an unknown label
    raises :class:`~dpokit.errors.ConfigError` listing the labels. Scores are softmax probabilities
    (sigmoid for a one-logit model).
    """
    import torch

    tokenizer, model, max_len = _load_sequence_classifier(model_path, "classifier judge", device, batch_size)
    num_labels = int(model.config.num_labels)
    idx = 0 if num_labels == 1 and label.lower() in {"label_0", "score"} else _label_index(model.config, label)
    if not 0 <= idx < num_labels:
        raise ConfigError(f"classifier judge: label {label!r} maps to index {idx}, but the model has {num_labels} outputs")

    def judge(texts: list[str]) -> list[float]:
        logits = _batched_logits(tokenizer, model, max_len, device, batch_size, texts)
        probs = torch.sigmoid(logits[:, 0]) if num_labels == 1 else torch.softmax(logits, dim=-1)[:, idx]
        return probs.tolist()

    judge.__name__ = f"classifier:{label}"
    return judge


def _dpokit_reward_model(model_path: str, device: str, batch_size: int):
    """`dpokit reward`'s model (its output directory, final/, or a LoRA adapter of it), loaded as it trains it
    (dpokit.models.loading.load_reward_model), with its tokenizer and the longest input it takes."""
    from dpokit.models.loading import load_reward_model, load_tokenizer, model_max_positions

    if batch_size < 1:
        raise ConfigError(f"reward judge: batch_size must be >= 1, got {batch_size}")
    tokenizer = load_tokenizer(model_path)
    model = load_reward_model(model_path, tokenizer.pad_token_id).to(device)
    return tokenizer, model, model_max_positions(model_path) or 512


def reward_judge(model_path: str, device: str = "cpu", batch_size: int = 32, *, append_eos: bool | None = None
                 ) -> Judge:
    """A judge returning the raw score (the one logit) of a local reward model: an
    ``AutoModelForSequenceClassification`` with ``num_labels == 1`` and its tokenizer, as TRL's reward trainer
    saves it. The text is scored as it is (no chat template); with `append_eos`, as dpokit trains a reward model
    (dpokit.judges.reward_rows: the text tokenised as a prompt, then EOS, right-padded; its last tokens kept when it is
    too long), the tokenisation of dpokit.experiments.paper.reward_model's reward models. A model with more than one output
    is refused: use ``classifier:PATH:LABEL`` for it.

    A `dpokit reward` output directory (or its final/, or a LoRA adapter of a reward model) is loaded as dpokit
    trains it, and by default scored as it was trained on (`append_eos`; `dpokit_metrics.json` in the model
    directory tells it); any other model by default as it is."""
    from dpokit.config.model import is_adapter_dir
    from dpokit.config.reward import reward_model_dir

    path = reward_model_dir(model_path)
    if append_eos is None:
        append_eos = (path / "dpokit_metrics.json").is_file()
    if path != Path(model_path) or is_adapter_dir(path):
        tokenizer, model, max_len = _dpokit_reward_model(str(path), device, batch_size)
    else:
        tokenizer, model, max_len = _load_sequence_classifier(model_path, "reward judge", device, batch_size)
    if int(model.config.num_labels) != 1:
        raise ConfigError(f"reward judge: {model_path!r} has {model.config.num_labels} outputs, a reward model has "
                          "one (for a classifier use classifier:PATH:LABEL)")

    def judge(texts: list[str]) -> list[float]:
        if append_eos:
            from dpokit.judges.reward_rows import text_scores

            return text_scores(model, tokenizer, texts, batch_size, max_len)
        return _batched_logits(tokenizer, model, max_len, device, batch_size, texts)[:, 0].tolist()

    judge.__name__ = "reward"
    return judge


def judge_continuations(judge: Judge, prompts: list, continuations: list[str]) -> list[float]:
    """Scores of `continuations` of `prompts` (strings, or chat messages for the implicit judge): a judge with a
    ``continuations`` method (the implicit reward) scores each continuation given its prompt; any other judge
    scores the full text ``prompt + continuation``."""
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    if hasattr(judge, "continuations"):
        return [float(s) for s in judge.continuations(list(prompts), list(continuations))]
    return judge([p + c for p, c in zip(prompts, continuations)])


