"""An LLM as a pairwise judge: a local instruction-tuned causal LM is asked which of two responses is better,
and its answer is read from the probabilities of its next token, never parsed from free text.

The question is a template (:data:`dpokit.judges.pairwise.DEFAULT_TEMPLATE`, or ``--judge-template FILE``) filled with
the prompt and the two responses, sent as one user turn through the judge's chat template with its generation
prompt (a tokenizer without a chat template gets the filled template as raw text). A prompt offered tools is
filled in with them (dpokit.judges.pairwise.judge_prompt_text). The judge's preference for
the first response is P(A) / (P(A) + P(B)) at the next position, where P(A) sums the probabilities of the
single-token spellings of the label ("A" and " A"). With ``both_orders`` it is also asked with the responses
swapped, and the two answers are averaged, so that a judge that favours a position cancels out.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dpokit.errors import ConfigError
from dpokit.judges.pairwise import PairwiseJudge, fill_template, judge_prompt_text
from dpokit.data.prompts import Prompt
from dpokit.data.chat import has_chat_template, prompt_token_ids, user_turn

LABELS = ("A", "B")


def label_token_ids(tokenizer: PreTrainedTokenizerBase, label: str) -> list[int]:
    """The ids of the single-token spellings of `label`, with and without a leading space: which one a model
    answers with depends on its tokenizer and on how the prompt ends."""
    ids: list[int] = []
    for text in (label, " " + label):
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) == 1 and encoded[0] not in ids:
            ids.append(encoded[0])
    if not ids:
        raise ConfigError(f"llm judge: the judge's tokenizer has no single token for the answer {label!r}")
    return ids


def judge_input_ids(tokenizer: PreTrainedTokenizerBase, template: str, prompt: Prompt, first: str,
                    second: str) -> list[int]:
    """The token ids the judge reads: the filled template as a user turn through the chat template (with the
    generation prompt, so the next token is the answer), or as raw text when the tokenizer has no template. The
    prompt's tools, if it has any, are shown with it (they belong to the question, not to the judge's own chat
    template: the judge is not offered them)."""
    text = fill_template(template, judge_prompt_text(prompt), first, second)
    return prompt_token_ids(tokenizer, user_turn(text) if has_chat_template(tokenizer) else text, "judge prompt")


@torch.no_grad()
def next_token_logprobs(model: PreTrainedModel, rows: list[list[int]], pad: int) -> torch.Tensor:
    """log-softmax of the next-token logits after each row of ids, ``[len(rows), vocab]`` (float32). Rows are
    left-padded with position ids counted from each row's first real token, so padding changes nothing."""
    width = max(map(len, rows))
    device = next(model.parameters()).device
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1).logits
    return torch.log_softmax(logits[:, -1].float(), dim=-1)


def first_preferences(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, template: str,
                      prompts: Sequence[Prompt], firsts: Sequence[str], seconds: Sequence[str], *,
                      batch_size: int = 8) -> list[float]:
    """P(A) / (P(A) + P(B)) for each pair shown as A = first, B = second (one order only)."""
    a_ids, b_ids = (label_token_ids(tokenizer, label) for label in LABELS)
    if set(a_ids) & set(b_ids):
        raise ConfigError("llm judge: the answers 'A' and 'B' share a token in the judge's tokenizer")
    limit = getattr(model.config, "max_position_embeddings", None)
    rows = []
    for i, (prompt, first, second) in enumerate(zip(prompts, firsts, seconds)):
        rows.append(judge_input_ids(tokenizer, template, prompt, first, second))
        if limit is not None and len(rows[-1]) > limit:
            raise ValueError(f"the judge prompt of pair {i + 1} is {len(rows[-1])} tokens, more than the judge's "
                             f"{limit} positions")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[float] = []
    for start in range(0, len(rows), batch_size):
        logprobs = next_token_logprobs(model, rows[start : start + batch_size], pad)
        # log P(A) - log P(B), each label's spellings pooled; sigmoid gives P(A) / (P(A) + P(B))
        margin = torch.logsumexp(logprobs[:, a_ids], -1) - torch.logsumexp(logprobs[:, b_ids], -1)
        out += torch.sigmoid(margin).tolist()
    return out


def llm_judge(path: str, *, template: str, both_orders: bool = True, batch_size: int = 8,
              device: str | None = None, dtype: str = "float32") -> PairwiseJudge:
    """A pairwise judge asking the causal LM at `path` (a model or adapter directory, or a hub name) the question
    `template`; see the module docstring. `device`: default CUDA when there is one, else the CPU."""
    from dpokit.models.loading import load_model, load_tokenizer

    if batch_size < 1:
        raise ConfigError(f"llm judge: batch size must be >= 1, got {batch_size}")
    tokenizer = load_tokenizer(path)
    for label in LABELS:  # before the (slow) model load
        label_token_ids(tokenizer, label)
    model = load_model(path, dtype=dtype).to(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def judge(prompts: Sequence[Prompt], firsts: Sequence[str], seconds: Sequence[str]) -> list[float]:
        forward = first_preferences(model, tokenizer, template, prompts, firsts, seconds, batch_size=batch_size)
        if not both_orders:
            return forward
        backward = first_preferences(model, tokenizer, template, prompts, seconds, firsts, batch_size=batch_size)
        return [(f + 1.0 - b) / 2 for f, b in zip(forward, backward)]

    judge.__name__ = f"llm:{path}"
    return judge
