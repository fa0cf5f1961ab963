"""Training files in the database: the SQL over `training_files`, run in the caller's transaction
(as `tenants` and `versions` do). A file's bytes are read only by `content`."""

from __future__ import annotations

import secrets
import time
from typing import Any

from sqlalchemy import Connection, Row, delete, func, insert, select

from prefixes.catalog.records import timestamp
from prefixes.storage.schema import training_files
from prefixes.tuning.records import FileInfo

ID_PREFIX = "file-"
# Every column but the bytes: listings and lookups never read a file's content.
_METADATA = [column for column in training_files.c if column.name != "content"]


def add(
    connection: Connection, owner: str, filename: str, purpose: str, content: bytes, examples: int
) -> FileInfo:
    file_id, now = ID_PREFIX + secrets.token_hex(12), time.time()
    connection.execute(
        insert(training_files).values(
            id=file_id,
            owner=owner,
            filename=filename,
            purpose=purpose,
            bytes=len(content),
            num_examples=examples,
            content=content,
            created_at=now,
        )
    )
    return FileInfo(file_id, owner, filename, purpose, len(content), examples, timestamp(now))


def usage(connection: Connection, owner: str) -> tuple[int, int]:
    """How many training files the tenant holds and their bytes."""
    count, total = connection.execute(
        select(func.count(), func.coalesce(func.sum(training_files.c.bytes), 0)).where(
            training_files.c.owner == owner
        )
    ).one()
    return int(count), int(total)


def row(connection: Connection, owner: str, file_id: str) -> Row[Any] | None:
    query = select(*_METADATA).where(
        training_files.c.owner == owner, training_files.c.id == file_id
    )
    return connection.execute(query).one_or_none()


def content(connection: Connection, owner: str, file_id: str) -> bytes | None:
    query = select(training_files.c.content).where(
        training_files.c.owner == owner, training_files.c.id == file_id
    )
    return connection.execute(query).scalar_one_or_none()


def page(
    connection: Connection, owner: str, purpose: str | None, limit: int, before: int | None
) -> list[Row[Any]]:
    """Up to `limit` + 1 of the tenant's files, newest first, created before `before` (a seq)."""
    query = select(*_METADATA).where(training_files.c.owner == owner)
    if purpose is not None:
        query = query.where(training_files.c.purpose == purpose)
    if before is not None:
        query = query.where(training_files.c.seq < before)
    query = query.order_by(training_files.c.seq.desc()).limit(limit + 1)
    return list(connection.execute(query).all())


def remove(connection: Connection, seq: int) -> None:
    connection.execute(delete(training_files).where(training_files.c.seq == seq))


def info(found: Row[Any]) -> FileInfo:
    return FileInfo(
        found.id,
        found.owner,
        found.filename,
        found.purpose,
        found.bytes,
        found.num_examples,
        timestamp(found.created_at),
    )
