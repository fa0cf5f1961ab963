"""Tenants, API keys (never stored in clear) and quotas."""

from __future__ import annotations

import hashlib
import sqlite3

import pytest
from sqlalchemy import inspect, text

from prefixes import PrefixError
from prefixes.catalog.records import Quotas
from prefixes.errors import (
    AlreadyExists,
    InvalidName,
    InvalidPrefix,
    KeyLimit,
    NotFound,
    QuotaExceeded,
    Unauthorized,
)
from prefixes.storage.database import DATABASE_FILE
from tests.registry_support import native_files, open_registry
from tests.tiny import tiny_loaded

# Each test runs on SQLite and on PostgreSQL (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("registry_backend")


@pytest.fixture(scope="module")
def llama():
    return tiny_loaded("llama")


@pytest.fixture
def registry(llama, tmp_path):
    with open_registry(
        tmp_path / "data", llama, default_quotas=Quotas(max_prefixes=3, max_bytes=1 << 20)
    ) as registry:
        yield registry


def database_dump(registry) -> str:
    """Every value of every table (and on SQLite the raw database and WAL bytes) as one string."""
    if registry.database.dialect.name == "postgresql":
        with registry.database.connect() as connection:
            tables = inspect(connection).get_table_names()
            rows = [connection.execute(text(f'SELECT * FROM "{t}"')).all() for t in tables]
        return "\n".join(repr(row) for table in rows for row in table)
    path = registry.data_dir / DATABASE_FILE
    connection = sqlite3.connect(path)
    tables = [row[0] for row in connection.execute("SELECT name FROM sqlite_master")]
    values = [
        repr(row)
        for table in tables
        if not table.startswith(("ix_", "sqlite_autoindex"))
        for row in connection.execute(f'SELECT * FROM "{table}"')
    ]
    connection.close()
    raw = b"".join(p.read_bytes() for p in registry.data_dir.glob(f"{DATABASE_FILE}*"))
    return "\n".join(values) + raw.decode("latin-1")


def test_keys_are_stored_only_as_hashes(registry):
    first = registry.create_tenant("alice")
    second = registry.issue_key("alice")
    assert first.api_key != second.api_key
    assert first.api_key not in repr(first)
    dump = database_dump(registry)
    for issued in (first, second):
        assert issued.api_key not in dump
        assert issued.api_key.encode().hex() not in dump
        assert hashlib.sha256(issued.api_key.encode()).hexdigest() in dump
        assert registry.authenticate(issued.api_key) == "alice"


def test_revoked_and_unknown_keys_are_unauthorized(registry):
    first = registry.create_tenant("alice")
    second = registry.issue_key("alice")
    registry.revoke_key("alice", first.key_id)
    with pytest.raises(Unauthorized):
        registry.authenticate(first.api_key)
    assert registry.authenticate(second.api_key) == "alice"
    for wrong in ("", "psk_nope", second.api_key + "x", second.api_key[:-1]):
        with pytest.raises(Unauthorized):
            registry.authenticate(wrong)
    with pytest.raises(NotFound):
        registry.revoke_key("alice", first.key_id)  # already revoked
    registry.create_tenant("bob")
    with pytest.raises(NotFound):
        registry.revoke_key("bob", second.key_id)  # not bob's key
    assert [(k.key_id, k.revoked) for k in registry.list_keys("alice")] == [
        (first.key_id, True),
        (second.key_id, False),
    ]


def test_tenant_names_are_checked_and_unique(registry):
    registry.create_tenant("alice")
    with pytest.raises(AlreadyExists):
        registry.create_tenant("alice")
    for bad in ("", "Alice", "-alice", "a" * 65, "a/b", "a b", "ä"):
        with pytest.raises(InvalidName):
            registry.create_tenant(bad)
    registry.create_tenant("a" * 64)
    registry.create_tenant("0.a_b-c")
    with pytest.raises(NotFound):
        registry.issue_key("carol")
    with pytest.raises(NotFound):
        registry.get_tenant("carol")


@pytest.mark.parametrize("ref", ["alice/x/y", "/x", "alice/", "Alice/x", "alice/X"])
def test_malformed_references_are_invalid_names(registry, ref):
    registry.create_tenant("alice")
    with pytest.raises(InvalidName) as error:
        registry.get(ref, tenant="alice")
    assert isinstance(error.value, PrefixError) and error.value.to_dict()["type"] == "InvalidName"


def test_prefix_count_quota_counts_live_prefixes_and_not_overwrites(llama, registry):
    registry.create_tenant("alice")
    for i in range(3):
        registry.upload("alice", f"p{i}", native_files(llama.spec, 2, seed=i))
    with pytest.raises(QuotaExceeded) as error:
        registry.upload("alice", "p3", native_files(llama.spec, 2, seed=3))
    assert (error.value.quota, error.value.limit, error.value.requested) == ("max_prefixes", 3, 4)
    assert "max_prefixes = 3" in str(error.value)
    registry.upload("alice", "p0", native_files(llama.spec, 2, seed=9), overwrite=True)
    registry.delete("p1", tenant="alice")
    registry.upload("alice", "p3", native_files(llama.spec, 2, seed=3))
    assert registry.usage("alice").prefixes == 3


def test_byte_quota_counts_stored_bytes(llama, registry):
    registry.create_tenant("alice")
    info = registry.upload("alice", "p0", native_files(llama.spec, 4, seed=0))
    registry.set_quotas("alice", Quotas(max_bytes=2 * info.bytes))
    registry.upload("alice", "p1", native_files(llama.spec, 4, seed=1))
    with pytest.raises(QuotaExceeded, match="max_bytes") as error:
        registry.upload("alice", "p2", native_files(llama.spec, 4, seed=2))
    assert error.value.requested == 3 * info.bytes
    # An overwrite replaces its bytes: same size fits, a larger one does not.
    registry.upload("alice", "p1", native_files(llama.spec, 4, seed=3), overwrite=True)
    with pytest.raises(QuotaExceeded, match="max_bytes"):
        registry.upload("alice", "p1", native_files(llama.spec, 5, seed=3), overwrite=True)
    assert registry.usage("alice").bytes == 2 * info.bytes


def test_virtual_token_quota_refuses_before_compiling(llama, registry):
    registry.create_tenant("alice", Quotas(max_virtual_tokens=4))
    assert registry.get_tenant("alice").quotas == Quotas(3, 1 << 20, 4)
    registry.upload("alice", "short", native_files(llama.spec, 4, seed=0))
    with pytest.raises(QuotaExceeded, match="max_virtual_tokens = 4, this upload needs 5"):
        registry.upload("alice", "long", native_files(llama.spec, 5, seed=1))
    # None falls back to the registry's defaults (no token cap: the server's limit applies).
    tenant = registry.set_quotas("alice", Quotas())
    assert tenant.quotas == Quotas(3, 1 << 20, None)
    registry.upload("alice", "long", native_files(llama.spec, 5, seed=1))


def test_update_quotas_changes_only_the_named_ones_and_none_restores_the_default(registry):
    registry.create_tenant("alice", Quotas(max_prefixes=2, max_virtual_tokens=8))
    assert registry.update_quotas("alice", max_bytes=10).quotas == Quotas(2, 10, 8)
    assert registry.update_quotas("alice").quotas == Quotas(2, 10, 8)
    # None follows the default (3 prefixes here), and a later default would reach it.
    assert registry.update_quotas("alice", max_prefixes=None).quotas == Quotas(3, 10, 8)
    with pytest.raises(NotFound):
        registry.update_quotas("carol", max_bytes=10)
    with pytest.raises(TypeError, match="max_requests"):
        registry.update_quotas("alice", max_requests=10)


@pytest.mark.parametrize(
    "value", [-1, 2**31, True, 1.0, "5"], ids=["negative", "too-big", "bool", "float", "str"]
)
def test_invalid_quota_values_are_refused_and_nothing_changes(registry, value):
    registry.create_tenant("alice")
    with pytest.raises(InvalidPrefix, match="max_prefixes: expected null or an integer from 0"):
        registry.update_quotas("alice", max_bytes=5, max_prefixes=value)
    with pytest.raises(InvalidPrefix):
        Quotas(max_virtual_tokens=value)
    assert registry.get_tenant("alice").quotas == Quotas(3, 1 << 20, None)
    registry.update_quotas("alice", max_bytes=2**63 - 1, max_prefixes=0)  # both ends allowed


def test_keep_one_refuses_to_revoke_the_last_active_key(registry):
    first = registry.create_tenant("alice")
    with pytest.raises(KeyLimit, match="last active key"):
        registry.revoke_key("alice", first.key_id, keep_one=True)
    assert registry.authenticate(first.api_key) == "alice"
    second = registry.issue_key("alice")
    registry.revoke_key("alice", first.key_id, keep_one=True)
    with pytest.raises(NotFound):  # an unknown or revoked key: NotFound, with keep_one or not
        registry.revoke_key("alice", first.key_id, keep_one=True)
    registry.revoke_key("alice", second.key_id)  # without keep_one, the last may go
    with pytest.raises(Unauthorized):
        registry.authenticate(second.api_key)
    with pytest.raises(NotFound, match="tenant 'carol' does not exist"):
        registry.revoke_key("carol", first.key_id)


def test_max_active_caps_the_active_keys_issued(registry):
    registry.create_tenant("alice")
    second = registry.issue_key("alice", max_active=2)
    with pytest.raises(KeyLimit, match="2 active keys"):
        registry.issue_key("alice", max_active=2)
    registry.revoke_key("alice", second.key_id)  # revoked keys do not count
    registry.issue_key("alice", max_active=2)
    registry.issue_key("alice")  # no cap unless asked
    assert [k.revoked for k in registry.list_keys("alice")] == [False, True, False, False]


def test_identify_names_the_key_and_list_keys_refuses_an_unknown_tenant(registry):
    first = registry.create_tenant("alice")
    key = registry.identify(first.api_key)
    assert (key.key_id, key.tenant, key.revoked) == (first.key_id, "alice", False)
    assert key == registry.list_keys("alice")[0]
    with pytest.raises(NotFound, match="tenant 'carol' does not exist"):
        registry.list_keys("carol")
