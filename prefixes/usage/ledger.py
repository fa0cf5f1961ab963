"""The usage table: batches added into rows by upserts, and reports read back.

A row is (tenant, model, hour) with one counter per column. A batch adds into the rows with
`INSERT ... ON CONFLICT DO UPDATE SET column = usage.column + excluded.column` (SQLite and
PostgreSQL spell it the same), so every replica on one database adds into the same rows and
nothing is read first.
"""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import Mapping
from enum import Enum
from typing import Any, cast

from sqlalchemy import Connection, Engine, Row, String, func, literal, select, tuple_
from sqlalchemy.dialects import postgresql, sqlite

from prefixes.errors import InvalidArgument
from prefixes.storage.database import read_transaction, write_transaction
from prefixes.storage.schema import MAX_BIGINT, USAGE_COUNTS, usage
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
        all (None), grouped, ordered by bucket, tenant and model; `limit` rows a page.

        Pages are keyed, not counted: a cursor holds the last row's key and the next page
        starts after it, so rows the flusher adds meanwhile never shift a page (an offset over
        a table that keeps growing would show a row twice or skip one)."""
        sums = [func.sum(usage.c[name]).label(name) for name in USAGE_COUNTS]
        keys: list[Any] = [usage.c.tenant, usage.c.model]
        bucketed = group_by is not GroupBy.PREFIX
        if bucketed:
            size = HOUR if group_by is GroupBy.HOUR else DAY
            keys.insert(0, (usage.c.hour // size) * size)
        query = select(*keys, *sums).where(usage.c.hour >= start, usage.c.hour < end)
        if tenant is not None:
            query = query.where(usage.c.tenant == tenant)
        after = decode_cursor(cursor, group_by)
        if after is not None:  # a group's key is its rows' key: filter the rows
            query = query.where(tuple_(*keys) > tuple_(*(literal(value) for value in after)))
        query = query.group_by(*keys).order_by(*keys).limit(limit + 1)
        with read_transaction(self.database) as connection:
            found = connection.execute(query).all()
        rows = [usage_row(row, start, bucketed=bucketed) for row in found]
        if len(rows) <= limit:
            return UsagePage(rows, None)
        last = rows[limit - 1]
        key = (last.start, last.tenant, last.model) if bucketed else (last.tenant, last.model)
        return UsagePage(rows[:limit], encode_cursor(group_by, key))


def usage_row(row: Row[Any], start: int, *, bucketed: bool) -> UsageRow:
    counts = Counts(**{name: int(getattr(row, name)) for name in USAGE_COUNTS})
    return UsageRow(int(row[0]) if bucketed else start, row.tenant, row.model, counts)


MAX_CURSOR = 2048  # characters: a key of the longest tenant and model names fits well within


def encode_cursor(group_by: GroupBy, key: tuple[Any, ...]) -> str:
    payload = {"group_by": group_by.value, "after": list(key)}
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode()


def decode_cursor(cursor: str | None, group_by: GroupBy) -> tuple[Any, ...] | None:
    """The key a page starts after: [bucket,] tenant, model, as `encode_cursor` wrote it for
    the same grouping; anything else is a 400 naming `cursor` (before the database sees it)."""
    if cursor is None:
        return None
    payload: Any = None
    # RecursionError: JSON nested past the parser's depth
    with contextlib.suppress(ValueError, RecursionError):
        if len(cursor) <= MAX_CURSOR:
            payload = json.loads(base64.urlsafe_b64decode(cursor.encode()))
    if not isinstance(payload, dict):
        payload = {}
    grouped = payload.get("group_by")
    if isinstance(grouped, str) and grouped != group_by.value:
        raise InvalidArgument(
            "cursor",
            f"the `next` value of a previous page grouped by {group_by.value}",
            f"a cursor of a page grouped by {grouped!r}",
        )
    key = payload.get("after")
    if grouped is None or not is_key(key, bucketed=group_by is not GroupBy.PREFIX):
        raise InvalidArgument("cursor", "the `next` value of a previous page", repr(cursor))
    return tuple(key)


def is_key(key: Any, *, bucketed: bool) -> bool:
    """[bucket,] tenant, model: values the database can bind and compare (no NUL, which
    PostgreSQL's text refuses, no lone surrogate, which cannot be encoded), within the
    columns' lengths."""
    lengths = [cast(String, column.type).length for column in (usage.c.tenant, usage.c.model)]
    if not isinstance(key, list) or len(key) != len(lengths) + bucketed:
        return False
    if bucketed:
        bucket, *key = key
        if type(bucket) is not int or not 0 <= bucket <= MAX_BIGINT:
            return False
    return all(
        isinstance(value, str) and len(value) <= (length or 0) and bindable(value)
        for value, length in zip(key, lengths, strict=True)
    )


def bindable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return "\x00" not in text
