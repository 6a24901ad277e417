"""Pairwise judges: which of two responses to a prompt is better (used by `dpokit winrate`).

A pairwise judge is a callable ``(prompts, firsts, seconds) -> list[float]``: for each prompt, the probability
(or verdict) that the response shown first is better than the one shown second, in [0, 1]; 0.5 is a tie, and
NaN means the judge could not judge that pair. Two kinds:

* :func:`from_pointwise` - any :mod:`dpokit.judges.pointwise` judge (``vader``, ``module:function``,
  ``classifier:PATH:LABEL``, ``reward:PATH``, ``implicit:POLICY:REF``): the response with the higher score wins
  (1 or 0), equal scores tie (0.5). It scores the prompt followed by the response (:func:`pointwise_text`), or
  the response given its prompt for a judge that can (the implicit reward).
* ``llm:PATH`` - a local instruction-tuned causal LM asked which response is better
  (:func:`dpokit.judges.llm.llm_judge`), with the prompt :data:`DEFAULT_TEMPLATE` or a template of your own.
  A prompt offered tools (a ToolPrompt: a --prompts object with ``tools``) is shown to it with those tools
  (:func:`judge_prompt_text`), since a tool call cannot be judged without the tools it calls.

:func:`load_pairwise_judge` builds one from a spec string. This module imports neither torch nor transformers,
so that the command line can show the default template at once.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from dpokit.errors import ConfigError
from dpokit.judges.pointwise import judge_continuations
from dpokit.data.prompts import Prompt
from dpokit.data.records import tools_of

PairwiseJudge = Callable[[Sequence[Prompt], Sequence[str], Sequence[str]], list[float]]

DEFAULT_TEMPLATE = """\
For the following query to a chatbot, which response is more helpful?

Query: {prompt}

Response A:
{response_a}

Response B:
{response_b}

Which response is more helpful? Answer with only "A" or "B"."""
"""The LLM judge's default question: the DPO paper's GPT-4 prompt for dialogue (Appendix C) asking for the
letter alone, since the answer is read from the probabilities of the next token rather than parsed."""

PLACEHOLDERS = ("prompt", "response_a", "response_b")
_PLACEHOLDER = re.compile(r"\{(" + "|".join(PLACEHOLDERS) + r")\}")


TOOLS_HEADING = "Tools available to the assistant:"
"""The line before the tool schemas in a judge's prompt (:func:`judge_prompt_text`)."""


def _message_text(message: dict) -> str:
    """One message as ``role: content``, an assistant's tool calls after its text as ``tool call: {...}`` lines
    (the function's name and arguments as JSON). A message without tool calls reads as it always did."""
    calls = message.get("tool_calls") or ()
    if not calls:
        return f"{message['role']}: {message['content']}"
    lines = [f"{message['role']}: {message.get('content') or ''}".rstrip()]  # a call-only turn has no text
    for call in calls:
        function = call.get("function", call) if isinstance(call, dict) else call
        lines.append(f"tool call: {json.dumps(function, ensure_ascii=False, default=str)}")
    return "\n".join(lines)


def prompt_text(prompt: Prompt) -> str:
    """A prompt as one string: plain text as it is; chat messages as ``role: content`` paragraphs (an assistant
    turn's tool calls included), or the content alone for a conversation of a single user turn."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and prompt[0].get("role") == "user":
        return str(prompt[0]["content"])
    return "\n\n".join(_message_text(m) for m in prompt)


def judge_prompt_text(prompt: Prompt) -> str:
    """What an LLM judge is shown as the prompt: :func:`prompt_text`, and when the prompt is offered tools (a
    ToolPrompt's, :func:`dpokit.data.records.tools_of`) a block after it, :data:`TOOLS_HEADING` and each tool
    schema as one line of JSON. A prompt without tools is shown exactly as :func:`prompt_text` gives it."""
    text = prompt_text(prompt)
    tools = tools_of(prompt)
    if not tools:
        return text
    schemas = "\n".join(json.dumps(tool, ensure_ascii=False, default=str) for tool in tools)
    return f"{text}\n\n{TOOLS_HEADING}\n{schemas}"


def pointwise_text(prompt: Prompt, response: str) -> str:
    """What a pointwise judge scores: a plain-text prompt followed by its continuation (as `dpokit demo` scores
    reviews), or a conversation followed by ``assistant:`` and the reply."""
    if isinstance(prompt, str):
        return prompt + response
    return prompt_text(prompt) + "\n\nassistant: " + response


def fill_template(template: str, prompt: str, response_a: str, response_b: str) -> str:
    """`template` with {prompt}, {response_a} and {response_b} replaced in one pass (a response that itself
    holds ``{response_b}`` stays as written; other braces are left alone)."""
    values = {"prompt": prompt, "response_a": response_a, "response_b": response_b}
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], template)


def read_template(path: str | Path) -> str:
    """A judge template from a file; each of {prompt}, {response_a} and {response_b} must appear in it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--judge-template {path}: no such file")
    template = path.read_text(encoding="utf-8")
    missing = [f"{{{name}}}" for name in PLACEHOLDERS if f"{{{name}}}" not in template]
    if missing:
        raise ConfigError(f"--judge-template {path}: missing placeholder {', '.join(missing)} (a template needs "
                          "{prompt}, {response_a} and {response_b})")
    return template


def from_pointwise(judge: Callable[[list[str]], list[float]]) -> PairwiseJudge:
    """A pointwise judge made pairwise: 1.0 when the first response scores higher, 0.0 when the second does, 0.5
    for equal scores, NaN when either score is NaN."""

    def pairwise(prompts: Sequence[Prompt], firsts: Sequence[str], seconds: Sequence[str]) -> list[float]:
        n = len(prompts)
        both_prompts, responses = list(prompts) * 2, list(firsts) + list(seconds)
        if hasattr(judge, "continuations"):  # it scores a response given its prompt (the implicit reward)
            scores = judge_continuations(judge, both_prompts, responses)
        else:
            scores = judge([pointwise_text(p, r) for p, r in zip(both_prompts, responses)])
        scores = [float(s) for s in scores]
        if len(scores) != 2 * n:
            raise ValueError(f"the judge returned {len(scores)} scores for {2 * n} texts")
        return [math.nan if math.isnan(a) or math.isnan(b) else 1.0 if a > b else 0.0 if a < b else 0.5
                for a, b in zip(scores[:n], scores[n:])]

    pairwise.__name__ = getattr(judge, "__name__", "judge")
    return pairwise


