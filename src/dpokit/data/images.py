"""The images of a preference row: its ``images`` column read into PIL images, and the image placeholders of its
chat messages (``{"type": "image"}`` content parts), each fault a one-line DataError naming the row and the field.

An ``images`` value is a list (or one item) of: a file path, relative to the data file's directory (or absolute); the
Hub's ``datasets.Image`` feature as stored in Parquet, ``{"bytes": ..., "path": ...}`` (the bytes when present, else
the path); raw bytes; or a PIL image (a data set loaded with ``datasets``). Every image is read and decoded when the
row is loaded, so a missing or unreadable file fails before any training, and is converted to RGB.

A conversational prompt holds one ``{"type": "image"}`` part per image, in order (TRL's and the Hub data sets'
format). A prompt whose turns are all plain strings gets the placeholders put in for it, as TRL does: one per image,
before the text of its first user turn.
"""

from __future__ import annotations

import io
import os
from typing import Any

from dpokit.errors import DataError

IMAGE_PART = {"type": "image"}
SUPPORTED = ("images are supported by dpokit dpo and dpokit eval (preference data with an 'images' column) and by "
             "dpokit generate (--image, or 'images' in --prompts objects)")


def refuse_images(row: dict, prov: str, command: str, column: str = "images") -> None:
    """A DataError when `row` has images in `column`, which `dpokit command` does not handle yet."""
    if row.get(column):
        raise DataError(f"{prov}: field {column!r} holds images, which dpokit {command} does not handle yet; "
                        f"{SUPPORTED}")


def _open(data: Any, where: str, prov: str, base_dir: str | None):
    from PIL import Image, UnidentifiedImageError

    if isinstance(data, Image.Image):
        return data.convert("RGB")
    label = "image bytes"
    if isinstance(data, str):
        if not data.strip():
            raise DataError(f"{prov}: field {where!r} is an empty path")
        path = data if os.path.isabs(data) or base_dir is None else os.path.join(base_dir, data)
        label = repr(data)
        if not os.path.isfile(path):
            hint = "" if base_dir is not None or os.path.isabs(data) else " (a relative path needs a local data file)"
            raise DataError(f"{prov}: field {where!r}: image {data!r} not found at {path}{hint}")
        opener = lambda: Image.open(path)  # noqa: E731
    elif isinstance(data, (bytes, bytearray)):
        opener = lambda: Image.open(io.BytesIO(data))  # noqa: E731
    else:
        raise DataError(f"{prov}: field {where!r} must be an image path, image bytes or "
                        f"{{'bytes': ..., 'path': ...}}, got {type(data).__name__}")
    try:
        with opener() as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DataError(f"{prov}: field {where!r}: cannot read {label} as an image "
                        f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from None


def read_images(value: Any, name: str, prov: str, base_dir: str | None) -> tuple | None:
    """The images of a row's images field (None: absent, null or empty), each read, decoded and in RGB."""
    if value is None:
        return None
    items = value if isinstance(value, (list, tuple)) else [value]
    images = []
    for i, item in enumerate(items):
        where = f"{name}[{i}]" if isinstance(value, (list, tuple)) else name
        if isinstance(item, dict):
            if item.get("bytes") is not None:
                item = item["bytes"]
            elif item.get("path") is not None:
                item = item["path"]
            else:
                raise DataError(f"{prov}: field {where!r} has neither 'bytes' nor 'path'")
        images.append(_open(item, where, prov, base_dir))
    return tuple(images) or None


def image_parts(messages: list[dict]) -> int:
    """How many ``{"type": "image"}`` content parts `messages` hold."""
    return sum(1 for m in messages if isinstance(m.get("content"), list)
               for part in m["content"] if part.get("type") == "image")


def with_placeholders(prompt: Any, images: tuple | None, name: str, prov: str, images_name: str) -> Any:
    """The prompt of a row with `images`, checked: one image part per image (put in before the first user turn's
    text when the prompt has none and only string contents, as TRL does). A mismatch is a DataError."""
    if not images:
        if isinstance(prompt, list) and image_parts(prompt):
            raise DataError(f"{prov}: field {name!r} has {image_parts(prompt)} image placeholder(s) but the row has "
                            f"no {images_name!r}")
        return prompt
    if not isinstance(prompt, list):
        raise DataError(f"{prov}: field {images_name!r} needs a conversational {name!r} (a list of messages whose "
                        "user turns hold {'type': 'image'} parts); this prompt is plain text")
    count = image_parts(prompt)
    if count == 0 and all(isinstance(m.get("content"), str) for m in prompt):
        out, done = [], False
        for m in prompt:
            if m["role"] == "user" and not done:
                m = {**m, "content": [IMAGE_PART] * len(images) + [{"type": "text", "text": m["content"]}]}
                done = True
            out.append(m)
        if done:
            return out
    if count != len(images):
        raise DataError(f"{prov}: field {images_name!r} holds {len(images)} image(s) but field {name!r} has {count} "
                        "image placeholder(s) ({'type': 'image'} content parts); they must match")
    return prompt
