"""The SQLAlchemy engine: SQLite (WAL) by default, any SQLAlchemy URL (PostgreSQL) by choice.

Writes go through `write_transaction`, which serialises them, so a check-then-insert (quotas,
"name is free", "no live row names this file") cannot interleave with another writer, in this
process or in another replica on the same database:

- SQLite: the transaction starts with BEGIN IMMEDIATE, taking the one write lock up front; a
  deferred transaction could also fail half-way when upgrading to a write lock.
- PostgreSQL: the transaction's first statement takes one transaction-scoped advisory lock,
  WRITE_LOCK_KEY, which PostgreSQL releases at commit or rollback. Row locks would not do: the
  checks read rows that do not exist yet (a free name, a file no row names).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, text

DATABASE_FILE = "registry.sqlite3"
_IMMEDIATE = "prefix_registry_immediate"  # our execution option: begin with BEGIN IMMEDIATE
# The advisory lock every PostgreSQL write transaction holds: "prefixes" in ASCII, a fixed
# 64-bit key that every replica and every version of this code must agree on. Never change it.
WRITE_LOCK_KEY = 0x7072_6566_6978_6573
_TAKE_WRITE_LOCK = text("SELECT pg_advisory_xact_lock(:key)")


def sqlite_url(data_dir: Path) -> str:
    return f"sqlite:///{Path(data_dir).resolve() / DATABASE_FILE}"


def open_engine(url: str) -> Engine:
    if url.startswith("postgresql"):
        # READ COMMITTED (PostgreSQL's default, stated here in case a server changes it): each
        # statement after the lock sees what the previous holder committed. Under REPEATABLE
        # READ the snapshot would date from the lock statement, before that holder's commit.
        return create_engine(url, pool_pre_ping=True, isolation_level="READ COMMITTED")
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        # pysqlite's own transaction handling does not emit BEGIN where SQLAlchemy expects one;
        # switch it off and begin explicitly below (the recipe in SQLAlchemy's SQLite docs).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
        cursor.execute("PRAGMA synchronous=FULL")  # a commit reported is a commit on disk
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        immediate = connection.get_execution_options().get(_IMMEDIATE, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A transaction that holds the database's write lock from its first statement."""
    with engine.connect() as connection:
        connection.execution_options(**{_IMMEDIATE: True})  # SQLite: BEGIN IMMEDIATE
        with connection.begin():
            if connection.dialect.name == "postgresql":
                # Before any read: what this transaction checks stays true until it commits.
                connection.execute(_TAKE_WRITE_LOCK, {"key": WRITE_LOCK_KEY})
            yield connection


@contextmanager
def read_transaction(engine: Engine) -> Iterator[Connection]:
    """Reads, never blocked by a writer. SQLite (WAL): one snapshot for the transaction;
    PostgreSQL (READ COMMITTED): each statement sees what was committed when it started."""
    with engine.connect() as connection, connection.begin():
        yield connection
