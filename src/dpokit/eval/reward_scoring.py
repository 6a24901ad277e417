"""A reward model's score of responses: r(x, y), the one output of a sequence classifier (`dpokit reward`'s output,
or any one-output ``AutoModelForSequenceClassification``) read at the last token of prompt + response that is not
padding (dpokit.models.rewards). Each (prompt, response) is tokenised as `dpokit reward` trains on it (as dpokit
tokenises a completion: chat template with the prompt's tools, prompt truncation, EOS after the response), so
that the two rewards of a pair here are the rewards/chosen and rewards/rejected of its training metrics."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from dpokit.data.batching import collate
from dpokit.data.records import Text
from dpokit.data.tokenize import TokenizeConfig
from dpokit.errors import ConfigError
from dpokit.eval.scoring import _pad, _truncated, tokenize_responses
from dpokit.models.logprobs import check_layout
from dpokit.train.engine import Scorer


@dataclass(frozen=True)
class ModelReward:
    """A reward model's reward of one (prompt, response); ``skipped`` says why a response was not scored (it does
    not fit in max_length even after prompt truncation), its reward is then None."""

    reward: float | None
    response_tokens: int = 0  # response tokens, EOS or end-of-turn included
    prompt_truncated: bool = False
    skipped: str | None = None

    def row(self) -> dict:
        """The fields written to a JSONL row."""
        out = {"reward": self.reward, "response_tokens": self.response_tokens,
               "prompt_truncated": self.prompt_truncated}
        return out if self.skipped is None else {**out, "skipped": self.skipped}


@torch.no_grad()
def model_rewards(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Text],
                  responses: Sequence[Text], *, settings: TokenizeConfig | None = None, batch_size: int = 16,
                  layout: str = "packed", sources: Sequence[str] | None = None,
                  tools: Sequence[list[dict] | None] | None = None, progress: bool = False) -> list[ModelReward]:
    """The reward of each response y to its prompt x under the reward model `model` (on the device it is to run
    on), in input order; responses that do not fit are returned with ``skipped`` set (or a DataError with
    ``settings.on_filtered == "error"``). `batch_size` responses at a time, shortest first, in `layout` (the plain
    layout where the model does not give the same rewards with it). `tools`: the tool schemas each prompt is
    offered, rendered by the chat template (default: a ToolPrompt's own; dpokit.eval.scoring.tokenize_responses)."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    settings = settings or TokenizeConfig()
    examples, _, records = tokenize_responses(tokenizer, prompts, responses, settings, sources, tools)
    kept = sorted((i for i, e in enumerate(examples) if e is not None), key=lambda i: examples[i].length)
    scorer = model if isinstance(model, Scorer) else Scorer(model)
    device = next(scorer.parameters()).device
    was_training = scorer.model.training
    scorer.eval()
    rewards: dict[int, float] = {}
    try:
        if kept:
            layout = check_layout(scorer, [examples[i] for i in kept[-4:]], layout, _pad(tokenizer), device=device,
                                  max_length=settings.max_length)
        with tqdm(total=len(kept), desc="scoring", unit="resp", disable=not progress) as bar:
            for lo in range(0, len(kept), batch_size):
                ids = kept[lo : lo + batch_size]
                batch = collate([examples[i] for i in ids], ids, layout=layout, pad_token_id=_pad(tokenizer))
                rewards.update(zip(ids, scorer(batch.to(device)).float().cpu().tolist()))
                bar.update(len(ids))
    finally:
        scorer.train(was_training)
    reason = f"longer than max_length={settings.max_length} after prompt truncation"
    return [ModelReward(None, skipped=reason) if e is None else
            ModelReward(rewards[i], len(e.responses[0]), _truncated(e, records[i], tokenizer, settings))
            for i, e in enumerate(examples)]


def load_reward_scorer(path: str, *, dtype: str = "float32", device: torch.device | str = "cpu",
                       attention: str = "auto") -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """A reward model (a directory, `dpokit reward`'s output directory or its final/, or a LoRA adapter of one) on
    `device` with the attention kernel `attention` chooses for the packed layout, and its tokenizer."""
    from dpokit.config.reward import reward_model_dir
    from dpokit.models.attention import choose_attention, set_attention
    from dpokit.models.loading import load_reward_model, load_tokenizer

    path = str(reward_model_dir(path))
    tokenizer = load_tokenizer(path)
    model = load_reward_model(path, tokenizer.pad_token_id, dtype=dtype).to(device)
    set_attention(model, choose_attention(attention, device, "packed", training=False))
    return model, tokenizer
