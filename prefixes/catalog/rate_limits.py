"""Tenants' own rate limits, in two columns of `tenants` (NULL: the server's default). The
server reads them all at once into a cache it refreshes (server/api/rate_limits.py), never one
tenant per request."""

from __future__ import annotations

from sqlalchemy import Connection, or_, select, update

from prefixes.catalog.records import RateLimits
from prefixes.errors import NotFound
from prefixes.storage.schema import tenants


def own_rate_limits(connection: Connection, name: str) -> RateLimits:
    row = connection.execute(
        select(tenants.c.requests_per_minute, tenants.c.tokens_per_minute).where(
            tenants.c.name == name
        )
    ).one_or_none()
    if row is None:
        raise NotFound(f"tenant {name!r} does not exist", field="tenant")
    return RateLimits(row.requests_per_minute, row.tokens_per_minute)


def set_rate_limits(connection: Connection, name: str, limits: RateLimits) -> None:
    result = connection.execute(
        update(tenants)
        .where(tenants.c.name == name)
        .values(
            requests_per_minute=limits.requests_per_minute,
            tokens_per_minute=limits.tokens_per_minute,
        )
    )
    if result.rowcount == 0:
        raise NotFound(f"tenant {name!r} does not exist", field="tenant")


def all_overrides(connection: Connection) -> dict[str, RateLimits]:
    """Every tenant that sets a limit of its own (the others follow the defaults)."""
    rows = connection.execute(
        select(tenants.c.name, tenants.c.requests_per_minute, tenants.c.tokens_per_minute).where(
            or_(
                tenants.c.requests_per_minute.is_not(None), tenants.c.tokens_per_minute.is_not(None)
            )
        )
    )
    return {row.name: RateLimits(row.requests_per_minute, row.tokens_per_minute) for row in rows}
