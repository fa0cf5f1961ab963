"""Files waiting to be deleted: the SQL over `file_deletions`, run in the caller's write
transaction.

Replicas share one store. A replica that resolved a version just before another replica
deleted it still reads the file, so with a grace period a file no live version names is not
unlinked at once: it is scheduled here, and whichever replica sweeps after `due_at` removes it,
if no live version names it again by then.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import Connection, delete, insert, select

from prefixes.storage.schema import file_deletions


def schedule(connection: Connection, sha256: str, due_at: float) -> None:
    """Schedule the file's deletion; one already scheduled keeps its earlier time."""
    found = connection.execute(
        select(file_deletions.c.sha256).where(file_deletions.c.sha256 == sha256)
    ).first()
    if found is None:  # the caller holds the write lock: nobody inserts in between
        connection.execute(insert(file_deletions).values(sha256=sha256, due_at=due_at))


def due(connection: Connection, now: float) -> list[str]:
    query = select(file_deletions.c.sha256).where(file_deletions.c.due_at <= now)
    return sorted(connection.execute(query).scalars())


def scheduled(connection: Connection) -> set[str]:
    return set(connection.execute(select(file_deletions.c.sha256)).scalars())


def cancel(connection: Connection, digests: Iterable[str]) -> None:
    digests = list(digests)
    if digests:
        connection.execute(delete(file_deletions).where(file_deletions.c.sha256.in_(digests)))


def cancel_all(connection: Connection) -> None:
    connection.execute(delete(file_deletions))
