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


class RegistryError(PrefixError):
    """Base class of what the prefix registry refuses: names, access, quotas, capacity."""


class InvalidName(RegistryError):
    """A tenant name, prefix name or reference does not follow `^[a-z0-9][a-z0-9._-]{0,63}$`."""


class NotFound(RegistryError):
    """No such tenant, key or prefix, or one the caller may not see (existence is not disclosed)."""


class AlreadyExists(RegistryError):
    """The name is taken (a prefix uploaded without overwrite, or a tenant created twice)."""


class Unauthorized(RegistryError):
    """An API key that is unknown or revoked."""


class KeyLimit(RegistryError):
    """A tenant's keys would go past a limit the caller asked to keep: revoking its last active
    key, or issuing one more than the active keys allowed (a tenant managing its own keys)."""


class QuotaExceeded(RegistryError):
    """An upload would take a tenant past one of its quotas."""

    def __init__(self, tenant: str, quota: str, limit: int, requested: int) -> None:
        super().__init__(
            f"quota exceeded for tenant {tenant!r}: {quota} = {limit}, "
            f"this upload needs {requested}",
            field=quota,
        )
        self.quota = quota
        self.limit = limit
        self.requested = requested

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "limit": self.limit, "requested": self.requested}


class Incompatible(RegistryError):
    """The prefix was compiled against another base model: serving it would be silently wrong."""


class PoolExhausted(RegistryError):
    """Every byte of the device pool is pinned by running requests; retry when some finish."""


class CorruptBlob(RegistryError):
    """A stored tensor file is missing or its bytes no longer match their sha256."""


class InvalidArgument(InvalidPrefix):
    """A request value outside what the registry accepts that is not about a prefix's contents
    (a listing cursor, a fine-tuning setting): the same field, expected, found."""


class InvalidState(RegistryError):
    """What was asked cannot happen in the current state: cancelling a finished job, deleting a
    training file that a job still needs."""
