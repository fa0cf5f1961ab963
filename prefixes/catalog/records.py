"""What the registry hands out: plain frozen dataclasses, no database or tensor objects."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Self

from prefixes.errors import InvalidPrefix
from prefixes.formats.kinds import PrefixKind


class _Choice(enum.StrEnum):
    """A field with a fixed set of values, read from a request: an unknown value is refused
    with the field's name (the class's, lower-cased) and every allowed value."""

    @classmethod
    def parse(cls, value: str) -> Self:
        try:
            return cls(value)
        except ValueError:
            *others, last = [member.value for member in cls]
            expected = f"{', '.join(others)} or {last}"
            raise InvalidPrefix(cls.__name__.lower(), expected, repr(value)) from None


class Visibility(_Choice):
    PRIVATE = "private"  # the owner only
    PUBLIC = "public"  # any tenant may read its metadata and use it


class Scope(_Choice):
    OWN = "own"
    PUBLIC = "public"  # every public prefix, the caller's own public ones included
    ALL = "all"  # own (any visibility) and everyone's public ones


# The largest value each quota may take: what its database column holds (docs/registry.md).
QUOTA_LIMITS = {"max_prefixes": 2**31 - 1, "max_bytes": 2**63 - 1, "max_virtual_tokens": 2**31 - 1}


@dataclass(frozen=True, slots=True)
class Quotas:
    """Per-tenant limits. A tenant's own value of None means the registry's default; in a
    tenant's effective quotas (`Tenant.quotas`), None means no limit. 0 refuses every upload."""

    max_prefixes: int | None = None
    max_bytes: int | None = None
    max_virtual_tokens: int | None = None

    def __post_init__(self) -> None:
        for name, limit in QUOTA_LIMITS.items():
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit
            ):
                raise InvalidPrefix(name, f"null or an integer from 0 to {limit}", repr(value))

    def over(self, defaults: Quotas) -> Quotas:
        """These quotas with every None taken from `defaults`."""
        return Quotas(
            self.max_prefixes if self.max_prefixes is not None else defaults.max_prefixes,
            self.max_bytes if self.max_bytes is not None else defaults.max_bytes,
            self.max_virtual_tokens
            if self.max_virtual_tokens is not None
            else defaults.max_virtual_tokens,
        )


DEFAULT_QUOTAS = Quotas(max_prefixes=1000, max_bytes=1 << 30, max_virtual_tokens=None)

RATE_LIMIT_MAX = 2**63 - 1


@dataclass(frozen=True, slots=True)
class RateLimits:
    """A tenant's own rate limits: None follows the server's default. 0 refuses everything."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    def __post_init__(self) -> None:
        for name in ("requests_per_minute", "tokens_per_minute"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, int)
                or not 0 <= value <= RATE_LIMIT_MAX
            ):
                raise InvalidPrefix(
                    name, f"null or an integer from 0 to {RATE_LIMIT_MAX}", repr(value)
                )


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    quotas: Quotas  # effective: defaults filled in
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Usage:
    prefixes: int
    bytes: int


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A new API key. `api_key` is shown once: the registry keeps only its hash."""

    tenant: str
    key_id: str
    api_key: str = field(repr=False)  # kept out of logs and tracebacks


@dataclass(frozen=True, slots=True)
class KeyInfo:
    key_id: str
    tenant: str
    created_at: datetime
    revoked: bool


@dataclass(frozen=True, slots=True)
class PrefixInfo:
    """One version of a prefix, as stored. `compatible` is False when it was compiled against
    another base model than the one loaded: such a prefix is listed but never served."""

    owner: str
    name: str
    version: int
    kind: PrefixKind
    num_virtual_tokens: int
    bytes: int
    sha256: str
    visibility: Visibility
    description: str
    created_at: datetime
    model_fingerprint: str
    compatible: bool
    # The file of its own parameters (prefixes/storage/paramfile.py); None for a version stored
    # before they were kept. `bytes` counts both files.
    parameters_sha256: str | None = None

    @property
    def id(self) -> str:
        return f"{self.owner}/{self.name}"

    def to_dict(self) -> dict[str, Any]:
        """The API's prefix object (docs API.md), plus the two model-binding fields."""
        return {
            "id": self.id,
            "owner": self.owner,
            "name": self.name,
            "version": self.version,
            "kind": self.kind.value,
            "num_virtual_tokens": self.num_virtual_tokens,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "visibility": self.visibility.value,
            "description": self.description,
            "created_at": self.created_at.isoformat(),
            "model_fingerprint": self.model_fingerprint,
            "compatible": self.compatible,
        }


@dataclass(frozen=True, slots=True)
class Page:
    items: list[PrefixInfo]
    next_cursor: str | None  # pass back as `cursor` for the next page; None at the end


def timestamp(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)
