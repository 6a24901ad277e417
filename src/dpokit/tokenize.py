"""Records -> token ids: chat templates, EOS, truncation and filtering.

The rules, which tests/test_tokenize.py pins down:

* **Boundary.** The prompt and each response are tokenised *separately* and concatenated, so the response
  tokens that are scored are exactly the tokens the model would emit after being given the prompt ids. The
  prompt gets the tokenizer's own special tokens (a BOS where the tokenizer adds one, as at generation
  time); responses get none. An empty prompt becomes the BOS (or EOS, GPT-2 style) token, so that the first
  response token has a position that predicts it.
* **EOS.** The EOS token is appended to every response, unless the response already ends with a special
  token (a chat template's end-of-turn marker, say).
* **Chat.** Conversational records are rendered with the tokenizer's chat template: the prompt with
  ``add_generation_prompt=True``, each response as the text the full conversation adds after it.
* **Truncation.** If prompt + longest response exceeds ``max_length``, the prompt is cut to
  ``max_prompt_length`` tokens, keeping its end (``keep_end``, right for dialogue) or its start
  (``keep_start``); a leading BOS is kept either way. Responses are never cut (a cut response loses its
  EOS and teaches the model to stop mid-sentence): an example that still does not fit is filtered.
* **Filtering.** Pairs whose responses are identical, and examples too long after prompt truncation, are
  counted by reason; ``on_filtered="skip"`` drops them and reports the counts, ``"error"`` fails the run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from dpokit.data.records import Completion, PreferencePair, Text
from dpokit.errors import ConfigError, DataError

TRUNCATION_MODES = ("keep_end", "keep_start")
FILTER_POLICIES = ("skip", "error")


@dataclass(frozen=True)
class TokenizeConfig:
    """How records become token ids (see the module docstring for the rules)."""

    max_length: int = 512
    max_prompt_length: int = 256
    truncation: str = "keep_end"
    on_filtered: str = "skip"

    def __post_init__(self) -> None:
        if self.truncation not in TRUNCATION_MODES:
            raise ConfigError(f"truncation must be one of {TRUNCATION_MODES}, got {self.truncation!r}")
        if self.on_filtered not in FILTER_POLICIES:
            raise ConfigError(f"on_filtered must be one of {FILTER_POLICIES}, got {self.on_filtered!r}")
        if not 0 < self.max_prompt_length < self.max_length:
            raise ConfigError(
                f"need 0 < max_prompt_length < max_length, got {self.max_prompt_length} and {self.max_length}"
            )


@dataclass(frozen=True)
class TokenizedExample:
    """A prompt and its responses as token ids: (chosen, rejected) for DPO, (completion,) for SFT."""

    prompt_ids: tuple[int, ...]
    responses: tuple[tuple[int, ...], ...]
    source: str = ""

    @property
    def length(self) -> int:
        """Tokens in the shared-prompt layout: the prompt once, then every response."""
        return len(self.prompt_ids) + sum(len(r) for r in self.responses)


@dataclass
class FilterReport:
    """What tokenisation kept and what it filtered, by reason, with a few sources per reason."""

    kept: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    prompts_truncated: int = 0

    def add(self, reason: str, source: str) -> None:
        """Count one filtered example under `reason`."""
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(source)

    @property
    def filtered(self) -> int:
        """Total number of filtered examples."""
        return sum(self.counts.values())

    def summary(self) -> str:
        """One line for the log: kept, truncated and filtered counts."""
        parts = [f"kept {self.kept}"]
        if self.prompts_truncated:
            parts.append(f"prompt truncated in {self.prompts_truncated}")
        for reason, n in sorted(self.counts.items()):
            parts.append(f"filtered {n} ({reason}; e.g. {', '.join(self.examples[reason])})")
        return "; ".join(parts)


def _special_ids(tokenizer) -> set[int]:
    return set(tokenizer.all_special_ids)


def _start_token(tokenizer) -> int:
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise ConfigError("the tokenizer has neither a BOS nor an EOS token; dpokit needs an EOS token")
    return token


def render_chat(tokenizer: PreTrainedTokenizerBase, prompt: list[dict], responses: Sequence[list[dict]], source: str) -> tuple[str, list[str]]:
    """Render a conversational prompt and responses with the chat template.

    Returns the prompt text (with the generation prompt) and, for each response, the text that the full
    conversation adds after the prompt. A template that does not render the prompt as a prefix of the full
    conversation cannot say which tokens are the response, and is an error.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError(
            f"{source}: conversational data needs a tokenizer with a chat template; this one has none "
            "(set tokenizer.chat_template, or give the data as plain prompt/chosen/rejected strings)"
        )
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    texts = []
    for response in responses:
        full = tokenizer.apply_chat_template(list(prompt) + list(response), tokenize=False)
        if not full.startswith(prompt_text):
            raise DataError(
                f"{source}: the chat template does not render the prompt as a prefix of the conversation, "
                "so the response tokens cannot be located"
            )
        texts.append(full[len(prompt_text):].rstrip())
    return prompt_text, texts


def _truncate_prompt(ids: list[int], limit: int, mode: str, bos: int | None) -> list[int]:
    keep_bos = bos is not None and ids and ids[0] == bos
    head, body = (ids[:1], ids[1:]) if keep_bos else ([], ids)
    room = limit - len(head)
    body = body[-room:] if mode == "keep_end" else body[:room]
    return head + body


def tokenize_examples(
    records: Sequence[PreferencePair | Completion],
    tokenizer: PreTrainedTokenizerBase,
    config: TokenizeConfig,
    *,
    description: str = "tokenising",
) -> tuple[list[TokenizedExample], FilterReport]:
    """Tokenise preference pairs (two responses) or completions (one) under the module's rules.

    Raises DataError naming the first offenders when `config.on_filtered == "error"` and anything was
    filtered; otherwise drops them and reports the counts in the returned FilterReport.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no EOS token; set tokenizer.eos_token before training")
    specials = _special_ids(tokenizer)
    bos = tokenizer.bos_token_id
    start = _start_token(tokenizer)
    report = FilterReport()
    examples: list[TokenizedExample] = []

    prompts, responses_per_record = [], []
    for record in records:
        responses = (record.chosen, record.rejected) if isinstance(record, PreferencePair) else (record.completion,)
        prompt: Text = record.prompt
        if isinstance(prompt, list):
            prompt_text, texts = render_chat(tokenizer, prompt, responses, record.source)
            prompts.append((prompt_text, False))
        else:
            prompts.append((prompt, True))
            texts = list(responses)
        responses_per_record.append(texts)

    plain = [text for text, special in prompts if special]
    chat = [text for text, special in prompts if not special]
    plain_ids = iter(tokenizer(plain, add_special_tokens=True)["input_ids"] if plain else [])
    chat_ids = iter(tokenizer(chat, add_special_tokens=False)["input_ids"] if chat else [])
    flat_responses = [t for texts in responses_per_record for t in texts]
    response_ids = iter(tokenizer(flat_responses, add_special_tokens=False)["input_ids"] if flat_responses else [])

    for record, (_, special), texts in tqdm(
        list(zip(records, prompts, responses_per_record)), desc=description, disable=len(records) < 2000
    ):
        prompt_ids = list(next(plain_ids) if special else next(chat_ids))
        if special and len(prompt_ids) > 1 and prompt_ids[-1] == eos:
            prompt_ids = prompt_ids[:-1]  # some tokenizers append EOS to every encoding; a prompt must not end
        if not prompt_ids:
            prompt_ids = [start]
        resps = []
        for _ in texts:
            ids = list(next(response_ids))
            if not ids or ids[-1] not in specials:
                ids.append(eos)
            resps.append(ids)
        if len(resps) == 2 and resps[0] == resps[1]:
            report.add("identical chosen and rejected", record.source)
            continue
        longest = max(len(r) for r in resps)
        if len(prompt_ids) + longest > config.max_length and len(prompt_ids) > config.max_prompt_length:
            prompt_ids = _truncate_prompt(prompt_ids, config.max_prompt_length, config.truncation, bos)
            report.prompts_truncated += 1
        if len(prompt_ids) + longest > config.max_length:
            report.add(f"longer than max_length={config.max_length} after prompt truncation", record.source)
            continue
        examples.append(TokenizedExample(tuple(prompt_ids), tuple(tuple(r) for r in resps), record.source))

    report.kept = len(examples)
    if report.filtered and config.on_filtered == "error":
        raise DataError(f"{report.summary()} (pass --on-filtered skip to drop them instead)")
    if not examples:
        raise DataError(f"no usable examples left after tokenisation: {report.summary()}")
    return examples, report
