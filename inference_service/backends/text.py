"""Small text utilities shared by the backends."""

from __future__ import annotations


class LeadingSpaceTrimmer:
    """Drops whitespace before the first visible character of a reply.

    Templates end with a cue such as `Assistant:`, so models start their reply with a space or newline
    that the user should not see.
    """

    def __init__(self) -> None:
        self._started = False

    def feed(self, text: str) -> str:
        if self._started:
            return text
        stripped = text.lstrip()
        self._started = bool(stripped)
        return stripped
