"""The SQLAlchemy engine: SQLite (WAL) by default, any SQLAlchemy URL (PostgreSQL) by choice.

Writes go through `write_transaction`. On SQLite it starts with BEGIN IMMEDIATE, taking the one
write lock up front: a check-then-insert (quotas, "name is free") cannot interleave with another
writer, and a deferred transaction can never fail half-way when upgrading to a write lock.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event

DATABASE_FILE = "registry.sqlite3"
_IMMEDIATE = "prefix_registry_immediate"  # our execution option: begin with BEGIN IMMEDIATE


def sqlite_url(data_dir: Path) -> str:
    return f"sqlite:///{Path(data_dir).resolve() / DATABASE_FILE}"


def open_engine(url: str) -> Engine:
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
        connection.execution_options(**{_IMMEDIATE: True})
        with connection.begin():
            yield connection


@contextmanager
def read_transaction(engine: Engine) -> Iterator[Connection]:
    """A consistent snapshot for reads (SQLite WAL: never blocked by a writer)."""
    with engine.connect() as connection, connection.begin():
        yield connection
