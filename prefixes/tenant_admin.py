"""Tenant administration without a loaded model (the `prefix-server tenant` command).

The registry needs the model's geometry to serve prefixes; creating a tenant and its key does
not, so an operator can do it offline, against the same database the server uses.
"""

from __future__ import annotations

from pathlib import Path

from prefixes import tenants as tenant_rows
from prefixes.database import open_engine, sqlite_url, write_transaction
from prefixes.records import IssuedKey, Quotas
from prefixes.schema import migrate


def create_tenant(data_dir: Path, database_url: str | None, name: str) -> IssuedKey:
    """Create a tenant with its first API key (shown once: only its hash is kept)."""
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    engine = open_engine(database_url or sqlite_url(Path(data_dir)))
    try:
        migrate(engine)
        with write_transaction(engine) as connection:
            tenant_rows.create_tenant(connection, name, Quotas())
            return tenant_rows.issue_key(connection, name)
    finally:
        engine.dispose()
