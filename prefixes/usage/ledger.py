"""The usage table: batches added into rows by upserts, and reports read back.

A row is (tenant, model, hour) with one counter per column. A batch adds into the rows with
`INSERT ... ON CONFLICT DO UPDATE SET column = usage.column + excluded.column` (SQLite and
PostgreSQL spell it the same), so every replica on one database adds into the same rows and
nothing is read first.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from enum import Enum
from typing import Any

from sqlalchemy import Connection, Engine, func, select
from sqlalchemy.dialects import postgresql, sqlite

from prefixes.errors import InvalidArgument
from prefixes.storage.database import read_transaction, write_transaction
from prefixes.storage.schema import MAX_OFFSET, USAGE_COUNTS, usage
from prefixes.usage.records import HOUR, Counts, UsageKey, UsagePage, UsageRow

DAY = 24 * HOUR


class GroupBy(Enum):
    PREFIX = "prefix"  # one row per tenant and model (prefix, ensemble, base) over the span
    DAY = "day"  # one row per tenant, model and day
    HOUR = "hour"  # one row per tenant, model and hour, as stored


def add(connection: Connection, batch: Mapping[UsageKey, Counts]) -> None:
    if not batch:
        return
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    rows = [
        {"tenant": key.tenant, "model": key.model, "hour": key.hour, **counts.as_dict()}
        for key, counts in batch.items()
    ]
    statement = dialect.insert(usage)
    statement = statement.on_conflict_do_update(
        index_elements=[usage.c.tenant, usage.c.model, usage.c.hour],
        set_={name: usage.c[name] + statement.excluded[name] for name in USAGE_COUNTS},
    )
    connection.execute(statement, rows)


class UsageLedger:
    """Reads and writes of the usage table on the registry's database."""

    def __init__(self, database: Engine) -> None:
        self.database = database

    def add(self, batch: Mapping[UsageKey, Counts]) -> None:
        """One transaction for the whole batch: it is written whole or not at all."""
        with write_transaction(self.database) as connection:
            add(connection, batch)

    def report(
        self,
        *,
        tenant: str | None,
        start: int,
        end: int,
        group_by: GroupBy,
        limit: int,
        cursor: str | None = None,
    ) -> UsagePage:
        """Usage in [start, end) (Unix seconds; hours that start in it), of one tenant or of
        all (None), grouped, ordered by bucket, tenant and model; `limit` rows a page."""
        sums = [func.sum(usage.c[name]).label(name) for name in USAGE_COUNTS]
        keys: list[Any] = [usage.c.tenant, usage.c.model]
        if group_by is not GroupBy.PREFIX:
            size = HOUR if group_by is GroupBy.HOUR else DAY
            keys.insert(0, ((usage.c.hour // size) * size).label("bucket"))
        query = (
            select(*keys, *sums)
            .where(usage.c.hour >= start, usage.c.hour < end)
            .group_by(*keys)
            .order_by(*keys)
        )
        if tenant is not None:
            query = query.where(usage.c.tenant == tenant)
        offset = decode_cursor(cursor)
        with read_transaction(self.database) as connection:
            found = connection.execute(query.offset(offset).limit(limit + 1)).all()
        rows = [
            UsageRow(
                start if group_by is GroupBy.PREFIX else int(row.bucket),
                row.tenant,
                row.model,
                Counts(**{name: int(getattr(row, name)) for name in USAGE_COUNTS}),
            )
            for row in found[:limit]
        ]
        more = len(found) > limit
        return UsagePage(rows, encode_cursor(offset + limit) if more else None)


def encode_cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"offset": offset}).encode()).decode()


def decode_cursor(cursor: str | None) -> int:
    if cursor is None:
        return 0
    try:
        offset = json.loads(base64.urlsafe_b64decode(cursor.encode()))["offset"]
    except (ValueError, KeyError, TypeError):
        offset = None
    if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset <= MAX_OFFSET:
        raise InvalidArgument("cursor", "the `next` value of a previous page", repr(cursor))
    return offset
