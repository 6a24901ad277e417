"""Checks of the conversational fields of a row: strings, chat messages (tool calls and tool turns included) and
the tool schemas of a ``tools`` column, each failing with a one-line DataError naming the row and the field.

A ``tools`` value is a list of tool schemas, or that list as a JSON string (how Parquet and CSV files usually
carry it): each an object with a ``name`` (``{"name": ..., "description": ..., "parameters": {...}}``) or the
OpenAI form ``{"type": "function", "function": {"name": ..., ...}}``. It is handed to the chat template as
``apply_chat_template(..., tools=...)``, as Transformers and TRL do; an empty list is no tools.
"""

from __future__ import annotations

import json
from typing import Any

from dpokit.errors import DataError

ROLES = ("system", "user", "assistant", "tool")
Tools = list  # [{"name": ..., ...}, ...] or [{"type": "function", "function": {"name": ..., ...}}, ...]


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _string(value: Any, name: str, prov: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise DataError(f"{prov}: field {name!r} must be a string, got {_type_name(value)}")
    if not allow_empty and (not value or value.isspace()):  # as `not value.strip()`, without copying the text
        raise DataError(f"{prov}: field {name!r} is empty")
    return value


def _named(value: Any) -> str | None:
    """The name of a tool schema or a tool call: its ``name``, or its ``function.name``."""
    if not isinstance(value, dict):
        return None
    holder = value["function"] if isinstance(value.get("function"), dict) else value
    name = holder.get("name")
    return name if isinstance(name, str) and name.strip() else None


def _tool_calls(value: Any, name: str, prov: str) -> list:
    if not isinstance(value, list):
        raise DataError(f"{prov}: field {name!r} must be a list of tool calls, got {_type_name(value)}")
    for i, call in enumerate(value):
        if _named(call) is None:
            raise DataError(f"{prov}: field '{name}[{i}]' must be a tool call with a 'function.name' (or 'name'), "
                            f"got {json.dumps(call, default=str)[:60]}")
    return value


def _message(value: Any, name: str, prov: str) -> dict:
    if not isinstance(value, dict):
        raise DataError(f"{prov}: field {name!r} must be a message object with 'role' and 'content', "
                        f"got {_type_name(value)}")
    calls = value.get("tool_calls")
    for key in ("role", "content"):
        if key not in value or (key == "role" and value[key] is None):
            if key == "content" and calls is not None:
                continue  # an assistant turn that only calls tools
            raise DataError(f"{prov}: missing field '{name}.{key}'")
    role = value["role"]
    if role not in ROLES:
        raise DataError(f"{prov}: field '{name}.role' must be one of {', '.join(ROLES)}, got {role!r}")
    if calls is not None:
        if role != "assistant":
            raise DataError(f"{prov}: field '{name}.tool_calls' is on a {role!r} message; only the assistant "
                            "calls tools")
        _tool_calls(calls, f"{name}.tool_calls", prov)
    if isinstance(value.get("content"), list):  # content parts: {"type": "text", "text": ...}, {"type": "image"}
        value = {**value, "content": _parts(value["content"], f"{name}.content", prov)}
    elif calls is None or value.get("content") is not None:
        _string(value["content"], f"{name}.content", prov, allow_empty=True)
    # Parquet/Arrow give every message every key of the schema, None where absent: drop those.
    message = {k: v for k, v in value.items() if v is not None}
    message.setdefault("content", "")  # a tool-calling turn without text: templates concatenate the content
    return message


def _parts(value: list, name: str, prov: str) -> list[dict]:
    """A message's content parts (TRL's and the Hub's multimodal format): text parts with a string ``text``, image
    placeholders; Parquet's None-valued keys dropped."""
    parts = []
    for i, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("text", "image"):
            raise DataError(f"{prov}: field '{name}[{i}]' must be a content part {{'type': 'text', 'text': ...}} or "
                            f"{{'type': 'image'}}, got {json.dumps(part, default=str)[:60]}")
        part = {k: v for k, v in part.items() if v is not None}
        if kind == "text":
            _string(part.get("text"), f"{name}[{i}].text", prov, allow_empty=True)
        parts.append(part)
    return parts


def content_text(content: Any) -> str:
    """The text of a message's content: the string, or its text parts joined."""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if p.get("type") == "text")
    return content or ""


def _messages(value: Any, name: str, prov: str) -> list[dict]:
    if not isinstance(value, list):
        raise DataError(f"{prov}: field {name!r} must be a list of messages, got {_type_name(value)}")
    if not value:
        raise DataError(f"{prov}: field {name!r} is empty")
    return [_message(m, f"{name}[{i}]", prov) for i, m in enumerate(value)]


def read_tools(value: Any, name: str, prov: str) -> Tools | None:
    """The tool schemas of a row's ``tools`` field (a list, or a JSON string of one); None for no tools (the
    field absent, null or an empty list). Anything else is a DataError naming the row and the field."""
    if value is None:
        return None
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise DataError(f"{prov}: field {name!r} is not valid JSON ({error.msg} at character {error.pos})") \
                from None
    if not isinstance(value, list):
        raise DataError(f"{prov}: field {name!r} must be a list of tool schemas (objects with a 'name'), got "
                        f"{_type_name(value)}")
    for i, tool in enumerate(value):
        if _named(tool) is None:
            raise DataError(f"{prov}: field '{name}[{i}]' must be a tool schema, an object with a 'name' (or "
                            f"'function.name'), got {json.dumps(tool, default=str)[:60]}")
    return value or None


def has_text(messages: list[dict]) -> bool:
    """Whether a response's messages say anything: some non-blank content, or a tool call."""
    return any(content_text(m.get("content")).strip() or m.get("tool_calls") for m in messages)
