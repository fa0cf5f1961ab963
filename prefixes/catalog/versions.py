"""Prefix versions in the database: the SQL over the `prefixes` table, run in the caller's
transaction (as `tenants` does for tenants and keys).

A row is one version of `owner/name`. Setting `retired_at` makes it a tombstone (deleted, or
replaced by a newer version); the partial unique index on live rows keeps one live version per
name. The catalog builds its answers on these functions; the serving side asks, under the write
lock, whether a live version still names a file before deleting it.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import (
    Connection,
    Row,
    exists,
    func,
    insert,
    literal,
    or_,
    select,
    tuple_,
    update,
)

from prefixes.catalog.records import Scope, Visibility
from prefixes.storage.schema import prefixes

LIVE = prefixes.c.retired_at.is_(None)


def live_row(connection: Connection, owner: str, name: str) -> Row[Any] | None:
    query = select(prefixes).where(prefixes.c.owner == owner, prefixes.c.name == name, LIVE)
    return connection.execute(query).one_or_none()


def describe(connection: Connection, row_id: int, changes: dict[str, str]) -> None:
    """Change a live version's visibility and description in place (no new version)."""
    connection.execute(update(prefixes).where(prefixes.c.id == row_id).values(**changes))


def retire(connection: Connection, row_id: int, when: float) -> None:
    connection.execute(update(prefixes).where(prefixes.c.id == row_id).values(retired_at=when))


def add_version(
    connection: Connection, previous: Row[Any] | None, version: dict[str, Any]
) -> dict[str, Any]:
    """Retire `previous` and insert the next version of `version`'s owner/name; return the
    inserted values. Numbers count retired rows too, so (owner/name, version) never names two
    different prefixes, even after a delete."""
    now = time.time()
    if previous is not None:
        retire(connection, previous.id, now)
    last = connection.execute(
        select(func.max(prefixes.c.version)).where(
            prefixes.c.owner == version["owner"], prefixes.c.name == version["name"]
        )
    ).scalar()
    values = {**version, "version": (last or 0) + 1, "created_at": now}
    connection.execute(insert(prefixes).values(**values))
    return values


def visible_page(
    connection: Connection,
    tenant: str,
    scope: Scope,
    limit: int,
    after: tuple[str, str] | None,
) -> list[Row[Any]]:
    """Up to `limit` + 1 live rows the tenant may see, in `owner/name` order, past `after`
    (owner, name); the extra row tells the caller that another page follows."""
    public = prefixes.c.visibility == Visibility.PUBLIC.value
    visible = {
        Scope.OWN: prefixes.c.owner == tenant,
        Scope.PUBLIC: public,
        Scope.ALL: or_(prefixes.c.owner == tenant, public),
    }[scope]
    query = select(prefixes).where(LIVE, visible)
    if after is not None:
        owner, name = after
        if scope is Scope.OWN and owner == tenant:  # lets the index seek to the name
            query = query.where(prefixes.c.name > name)
        else:
            cursor = tuple_(literal(owner), literal(name))
            query = query.where(tuple_(prefixes.c.owner, prefixes.c.name) > cursor)
    query = query.order_by(prefixes.c.owner, prefixes.c.name).limit(limit + 1)
    return list(connection.execute(query).all())


def compiled_elsewhere(connection: Connection, fingerprint: str | None) -> list[Row[Any]]:
    """Live rows compiled against another model than `fingerprint`, in `owner/name` order."""
    query = select(prefixes).where(LIVE, prefixes.c.model_fingerprint != fingerprint)
    return list(connection.execute(query.order_by(prefixes.c.owner, prefixes.c.name)).all())


def is_referenced(connection: Connection, sha256: str) -> bool:
    """Whether a live version names this file (as its compiled KV or its parameters)."""
    named = or_(prefixes.c.sha256 == sha256, prefixes.c.parameters_sha256 == sha256)
    return bool(connection.execute(select(exists().where(LIVE, named))).scalar())


def live_digests(connection: Connection) -> set[str]:
    """The files live versions name: compiled KV and parameters."""
    rows = connection.execute(select(prefixes.c.sha256, prefixes.c.parameters_sha256).where(LIVE))
    return {digest for row in rows for digest in row if digest is not None}
