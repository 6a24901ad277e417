"""Chat templates: a conversation rendered as the prompt text plus each response's text, a prompt's token ids
exactly as training and generation see them, and the token a template ends an assistant turn with.

dpokit.data.tokenize applies these rules to whole data sets (its docstring states them); dpokit.eval.generation uses
:func:`prompt_token_ids` so that a model is sampled from the context it was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from jinja2 import TemplateError

from dpokit.data.records import Text
from dpokit.errors import ConfigError, DataError

if TYPE_CHECKING:  # annotations only: reading prompt files (dpokit.data.prompts) must not import transformers
    from transformers import PreTrainedTokenizerBase


def _special_ids(tokenizer) -> set[int]:
    # all_special_ids misses tokens added as special outside the named slots (Llama 3's <|eot_id|>)
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_ids) | {i for i, token in added.items() if getattr(token, "special", False)}


def _start_token(tokenizer) -> int:
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise ConfigError("the tokenizer has neither a BOS nor an EOS token; dpokit needs an EOS token")
    return token


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether `tokenizer` carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def user_turn(prompt: str) -> list[dict]:
    """A plain-text prompt as a conversation: one user turn."""
    return [{"role": "user", "content": prompt}]


def assistant_turn(response: str) -> list[dict]:
    """A plain-text response as one assistant turn."""
    return [{"role": "assistant", "content": response}]


_RENDERS_TOOLS: dict[str, bool] = {}  # chat template -> whether it renders the tools it is given
_PROBE_TOOL = {"type": "function", "function": {"name": "dpokit_probe_tool", "description": "probe",
                                                "parameters": {"type": "object", "properties": {}}}}


def _check_renders_tools(tokenizer: PreTrainedTokenizerBase, source: str) -> None:
    """A chat template that ignores `tools` would train (or sample) without them, silently: an error."""
    template = str(tokenizer.chat_template)
    if template not in _RENDERS_TOOLS:
        try:
            text = tokenizer.apply_chat_template(user_turn("hi"), tools=[_PROBE_TOOL], tokenize=False,
                                                 add_generation_prompt=True)
        except TemplateError:
            text = ""
        _RENDERS_TOOLS[template] = "dpokit_probe_tool" in text
    if not _RENDERS_TOOLS[template]:
        raise DataError(f"{source}: field 'tools' is given but the tokenizer's chat template does not render "
                        "tools; use a model whose template does, or drop the tools column")


def render_chat(tokenizer: PreTrainedTokenizerBase, prompt: list[dict], responses: Sequence[list[dict]], source: str,
                tools: list[dict] | None = None) -> tuple[str, list[str]]:
    """Render a conversational prompt and responses with the chat template (given `tools`, the tool schemas,
    when not None).

    Returns the prompt text (with the generation prompt) and, for each response, the text that the full
    conversation adds after the prompt. A template that does not render the prompt as a prefix of the full
    conversation cannot say which tokens are the response, and is an error; so is one that ignores `tools`.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError(
            f"{source}: conversational data needs a tokenizer with a chat template; this one has none "
            "(set tokenizer.chat_template, or give the data as plain prompt/chosen/rejected strings)"
        )
    if tools:
        _check_renders_tools(tokenizer, source)
    extra = {"tools": tools} if tools else {}
    try:
        prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, **extra)
        fulls = [tokenizer.apply_chat_template(list(prompt) + list(r), tokenize=False, **extra) for r in responses]
    except TemplateError as error:  # a template's own check (roles must alternate, ...): name the record
        raise DataError(f"{source}: the chat template refused the conversation: {error}") from None
    texts = []
    for full in fulls:
        if not full.startswith(prompt_text):
            raise DataError(
                f"{source}: the chat template does not render the prompt as a prefix of the conversation, "
                "so the response tokens cannot be located"
            )
        texts.append(full[len(prompt_text):].rstrip())
    return prompt_text, texts


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, prompt: Text, source: str = "prompt",
                     tools: list[dict] | None = None) -> list[int]:
    """The ids of one prompt exactly as tokenisation gives them (before any truncation): a message list rendered
    with the chat template (and `tools`) and its generation prompt, without added special tokens; plain text with
    the tokenizer's special tokens, less a trailing EOS; an empty prompt as the start token. Generation uses this,
    so that a model is sampled from the context it was trained on."""
    if tools and not isinstance(prompt, list):
        raise DataError(f"{source}: tools need a conversational prompt (a list of messages) rendered with the chat "
                        "template; this prompt is plain text")
    if isinstance(prompt, list):
        text, _ = render_chat(tokenizer, prompt, [], source, tools)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if len(ids) > 1 and ids[-1] == tokenizer.eos_token_id:
            ids = ids[:-1]
    return list(ids) or [_start_token(tokenizer)]


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The token a chat template ends an assistant turn with (``<|im_end|>``, ``<|eot_id|>``): the last token
    of a rendered assistant turn, as tokenisation scores it, when that is a special token; None when the
    tokenizer has no chat template, the turn ends in ordinary text (responses then end with EOS), or the template
    cannot render a one-question conversation as its prompt plus a reply (stopping then relies on EOS and the
    model's own generation config)."""
    if not has_chat_template(tokenizer):
        return None
    try:
        _, (text,) = render_chat(tokenizer, user_turn("hi"), [assistant_turn("ok")], "probe")
    except DataError:
        return None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[-1] if ids and ids[-1] in _special_ids(tokenizer) else None
