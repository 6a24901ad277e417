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


def glued_boundary_warning(records: Sequence[PreferencePair | Completion]) -> str | None:
    """A warning when plain-text examples join prompt and response with no whitespace between two words, which
    tokenises them as one word ("The film" + "is a delight" reads "The filmis a delight"); None when none do.
    Conversational records are left out: the chat template decides their boundary."""
    glued = [r for r in records if isinstance(r.prompt, str)
             and any(isinstance(x, str) and _glued(r.prompt, x) for x in _responses(r))]
    if not glued:
        return None
    first = glued[0]
    response = next(x for x in _responses(first) if isinstance(x, str) and _glued(first.prompt, x))
    where = f" at {first.source}" if first.source else ""
    return (f"warning: {len(glued)} of {len(records)} examples join prompt and response with no space between two "
            f"words (e.g. {first.prompt[-20:]!r} + {response[:20]!r}{where}), so they are tokenised as one word; "
            "add the space (to the prompt's end or the response's start) if it was meant")
