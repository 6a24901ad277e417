"""Checks on loaded records that are not errors but usually mistakes: reported with counts and an example."""

from __future__ import annotations

from collections.abc import Sequence

from dpokit.data.records import Completion, PreferencePair


def _responses(record: PreferencePair | Completion) -> list:
    if isinstance(record, Completion):
        return [record.completion]
    return [record.chosen, record.rejected]


def _glued(prompt: str, response: str) -> bool:
    """Two words run together where plain-text prompt and response meet ("The film" + "is good")."""
    return bool(prompt) and bool(response) and prompt[-1].isalnum() and response[0].isalnum()


def glued_response(record: PreferencePair | Completion) -> str | None:
    """The first plain-text response of `record` that runs into its plain-text prompt with no space, or None."""
    if not isinstance(record.prompt, str):
        return None
    return next((x for x in _responses(record) if isinstance(x, str) and _glued(record.prompt, x)), None)


def glued_boundary_warning(records: Sequence[PreferencePair | Completion]) -> str | None:
    """A warning when plain-text examples join prompt and response with no whitespace between two words, which
    tokenises them as one word ("The film" + "is a delight" reads "The filmis a delight"); None when none do.
    Conversational records are left out: the chat template decides their boundary."""
    glued = [r for r in records if glued_response(r) is not None]
    return glued_boundary_message(len(glued), len(records), glued[0] if glued else None)


def glued_boundary_message(count: int, total: int, first: PreferencePair | Completion | None) -> str | None:
    """:func:`glued_boundary_warning` from counts: `count` of `total` records are glued, `first` the first of
    them (for records seen one at a time: dpokit.data.streaming)."""
    if not count or first is None:
        return None
    response = glued_response(first)
    where = f" at {first.source}" if first.source else ""
    return (f"warning: {count} of {total} examples join prompt and response with no space between two "
            f"words (e.g. {first.prompt[-20:]!r} + {response[:20]!r}{where}), so they are tokenised as one word; "
            "add the space (to the prompt's end or the response's start) if it was meant")
