"""Typed records: what every data source and format is turned into, with provenance for error messages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

Message = dict  # {"role": str, "content": str}, an assistant's may carry "tool_calls"
Text = Union[str, list[Message]]  # plain text, or chat messages rendered later with the chat template


@dataclass(frozen=True)
class PreferencePair:
    """One preference: `chosen` is preferred to `rejected` as a continuation of `prompt`.

    `prompt` is a string, or a list of chat messages; `chosen` and `rejected` are strings, or lists of
    assistant messages when the prompt is conversational. `source` says where the record came from
    ("data.jsonl:12" or "dataset[train] row 11") so that later errors can name it. `tools`: the tool schemas
    the chat template is given with the conversation (the row's ``tools`` column), or None. `images`: the
    row's images (its ``images`` column, dpokit.data.images), or None.
    """

    prompt: Text
    chosen: Text
    rejected: Text
    source: str = ""
    tools: list[dict] | None = None
    images: tuple | None = None  # the row's images (PIL, RGB), one per {"type": "image"} part of the prompt


@dataclass(frozen=True)
class Completion:
    """One supervised example for SFT: `completion` continues `prompt` (same typing rules as PreferencePair).

    `label` is None for SFT data; in unpaired data (KTO) it says whether the completion is desirable. `tools`
    and `images` as in PreferencePair (images: SFT data only)."""

    prompt: Text
    completion: Text
    source: str = ""
    label: bool | None = None
    tools: list[dict] | None = None
    images: tuple | None = None


class ToolPrompt(list):
    """Chat messages offered tools: a list of messages (used wherever one is) whose `tools` are the tool schemas
    the chat template renders with them. `dpokit generate`, `iterate` and `winrate` read one from a prompt file's
    JSON object with a ``tools`` field."""

    def __init__(self, messages, tools: list[dict] | None):
        super().__init__(messages)
        self.tools = tools


class ImagePrompt(ToolPrompt):
    """Chat messages with images (``dpokit generate --image``, or an ``images`` list in a --prompts object): one
    ``{"type": "image"}`` content part per image of `images` (PIL, RGB), in order; `given` holds the images as the
    user named them (paths), for the output."""

    def __init__(self, messages, images: tuple, given: list | None = None, tools: list[dict] | None = None):
        super().__init__(messages, tools)
        self.images = images
        self.given = given


def images_of(prompt) -> tuple | None:
    """The images of a prompt (an ImagePrompt's), or None."""
    return getattr(prompt, "images", None)


def tools_of(prompt) -> list[dict] | None:
    """The tools a prompt is offered (a ToolPrompt's), or None."""
    return getattr(prompt, "tools", None)
