"""The plain records of usage: what one piece of work adds, and the rows a query answers."""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import Enum

from prefixes.storage.schema import USAGE_COUNTS

HOUR = 3600


class Failure(Enum):
    """Why a request or a row did not run to its end: a counter of its own each."""

    INVALID = "failed_invalid"  # refused by the engine's checks (prompt too long, ...)
    RATE_LIMITED = "failed_rate_limited"  # over the tenant's requests or tokens per minute
    OVERLOADED = "failed_overloaded"  # the queue or the tenant's share of the pool was full
    ERROR = "failed_error"  # failed in the engine (numerical overflow, a constraint, a bug)
    CANCELLED = "cancelled"  # the client went away; what it generated is counted


@dataclass(slots=True)
class Counts:
    """Counters that add up. Mutable: the meter adds into one per key."""

    requests: int = 0  # HTTP calls the engine ran (a call of n choices or 3 prompts is one)
    rows: int = 0  # engine rows (an ensemble runs one per member, n choices n)
    prompt_tokens: int = 0  # as the responses report them: a prompt once per call and prompt
    completion_tokens: int = 0  # generated tokens the responses carry (a vote's every candidate)
    virtual_tokens: int = 0  # the prefix's virtual tokens, as the responses' prefix_tokens
    tuning_tokens: int = 0  # tokens a fine-tuning job trained on
    failed_invalid: int = 0
    failed_rate_limited: int = 0
    failed_overloaded: int = 0
    failed_error: int = 0
    cancelled: int = 0

    def add(self, other: Counts) -> None:
        for name in USAGE_COUNTS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in USAGE_COUNTS}

    @property
    def empty(self) -> bool:
        return not any(getattr(self, name) for name in USAGE_COUNTS)


assert tuple(f.name for f in fields(Counts)) == USAGE_COUNTS, "Counts and the table differ"


@dataclass(frozen=True, slots=True)
class UsageKey:
    tenant: str
    model: str  # a prefix or stored ensemble reference, or the base model's id
    hour: int  # Unix seconds at the start of the hour (UTC)


def hour_of(when: float) -> int:
    return int(when // HOUR) * HOUR


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One line of a usage report: a bucket (its start, and the tenant and model where the
    report is grouped by them) and what was counted in it."""

    start: int  # Unix seconds: the hour's or day's start; the report's start for group_by model
    tenant: str | None
    model: str | None
    counts: Counts


@dataclass(frozen=True, slots=True)
class UsagePage:
    rows: list[UsageRow]
    next_cursor: str | None
