"""Typed errors for prefixes: each message names the field, what was expected and what was found."""

from __future__ import annotations

from typing import Any


class PrefixError(ValueError):
    """Base class: something about an uploaded or stored prefix is not acceptable."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "message": self.message, "field": self.field}


class UnsupportedFormat(PrefixError):
    """The files are not a format we read (pickles, LoRA, unknown layouts, malformed files)."""


class InvalidPrefix(PrefixError):
    """The prefix is readable but does not fit the loaded model or the configured limits."""

    def __init__(self, field: str, expected: Any, found: Any, detail: str = "") -> None:
        message = f"{field}: expected {expected}, found {found}"
        if detail:
            message = f"{message} ({detail})"
        super().__init__(message, field=field)
        self.expected = expected
        self.found = found

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "expected": str(self.expected), "found": str(self.found)}
