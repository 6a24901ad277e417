"""Prompts as a user gives them to `dpokit generate`: plain text, or chat messages as JSON (light: no torch).

``--prompt`` is plain text unless it is a JSON list of messages (``[{"role": "user", "content": "hi"}]``).
A ``--prompts`` file ending in ``.jsonl`` holds one JSON value per non-blank line: a string (plain text), a list
of messages, or an object with a ``prompt`` (string or messages) or ``messages`` field, so that the output of
`dpokit generate` can be read back; any other file holds one plain-text prompt per non-blank line. Messages are
checked like conversational data (roles, string contents), and errors name the file and line. An object may carry
``tools`` (tool schemas, as a data set's tools column): its prompt becomes a :class:`ToolPrompt` (a plain-text
prompt as one user turn), rendered with the tools by the chat template. For `dpokit generate` an object may carry
``images`` (paths relative to the file's directory): its prompt becomes an :class:`ImagePrompt`; other commands
refuse them in one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

from dpokit.data.chat import user_turn
from dpokit.data.messages import read_tools
from dpokit.data.images import read_images, refuse_images, with_placeholders
from dpokit.data.records import ImagePrompt, ToolPrompt
from dpokit.errors import ConfigError, DataError

Prompt = Union[str, list[dict]]  # plain text, or chat messages


def _messages(value, where: str) -> list[dict]:
    from dpokit.data.formats import _messages as checked_messages  # the conversational data's own checks

    return checked_messages(value, "messages", where)


def parse_prompt(text: str, where: str = "--prompt") -> Prompt:
    """A `--prompt` value: a JSON list of messages (``[{"role": "user", "content": "hi"}]``), else plain text."""
    if text.lstrip().startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return text  # text that happens to start with "["
        return _messages(value, where)
    return text


def with_images(prompt: Prompt, given: list, where: str, base_dir: str | None, name: str = "images") -> Prompt:
    """`prompt` with the images `given` (paths relative to `base_dir`, or absolute): an ImagePrompt whose messages
    hold one image part per image (put before the first user turn's text when they hold none, as for data)."""
    images = read_images(given, name, where, base_dir)
    if not images:
        return prompt
    messages = user_turn(prompt) if isinstance(prompt, str) else list(prompt)
    messages = with_placeholders(messages, images, "prompt", where, name)
    return ImagePrompt(messages, images, list(given) if isinstance(given, (list, tuple)) else [given],
                       getattr(prompt, "tools", None))


def _prompt_of_line(value, where: str, base_dir: str | None = None) -> Prompt:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _messages(value, where)
    if isinstance(value, dict) and value.get("images") and base_dir is not None:
        return with_images(_prompt_of_line({k: v for k, v in value.items() if k != "images"}, where), value["images"],
                           where, base_dir)
    if isinstance(value, dict):
        prompt = None
        if "messages" in value:
            prompt = _messages(value["messages"], where)
        elif isinstance(value.get("prompt"), (str, list)):
            prompt = _prompt_of_line(value["prompt"], where)
        tools = read_tools(value.get("tools"), "tools", where)
        if prompt is not None:
            return ToolPrompt(user_turn(prompt) if isinstance(prompt, str) else prompt, tools) if tools else prompt
    raise DataError(f"{where}: expected a JSON string, a list of messages, or an object with a 'prompt' or "
                    f"'messages' field; got {json.dumps(value)[:60]}")


def read_prompts(path: str | Path, *, images: bool = False, command: str = "generate") -> list[Prompt]:
    """The prompts of a `--prompts` file.

    ``.jsonl``: one JSON value per non-blank line: a string (plain text), a list of messages, or an object with
    a ``prompt`` (string or messages) or ``messages`` field (so `dpokit generate --jsonl` output can be read
    back), and optionally ``tools`` and (with `images`; else a DataError naming `command`) ``images``: a list of
    image paths relative to the file's directory, giving an ImagePrompt. Any other file: one plain-text prompt per
    non-blank line. Errors name the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--prompts {path}: no such file")
    prompts: list[Prompt] = []
    jsonl = path.suffix.lower() == ".jsonl"
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if not jsonl:
            prompts.append(line)
            continue
        where = f"{path}:{number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not valid JSON ({error.msg})") from None
        if isinstance(value, dict) and not images:
            refuse_images(value, where, command)
        prompts.append(_prompt_of_line(value, where, str(path.resolve().parent)))
    if not prompts:
        raise DataError(f"{path}: no prompts (the file is empty)")
    return prompts
