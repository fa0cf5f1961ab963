"""10,000 prefixes: listing pages, resolve and acquire stay fast because every query uses an index.

Registering 10,000 through `upload` takes minutes on this machine (each upload fsyncs its file,
its directory and the database), so here the rows are inserted as `upload` writes them, pointing
at a few files that were really uploaded (as identical uploads share a file). bench/registry.py
registers 10,000 through `upload` and reports the figures in docs/benchmarks.md.
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import Engine, event, insert

from prefixes.storage.database import open_engine, sqlite_url
from prefixes.storage.schema import prefixes
from tests.registry_support import native_files, open_registry
from tests.tiny import tiny_loaded

COUNT = 10_000
TENANTS = ("alice", "bob", "carol", "dave")


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    llama = tiny_loaded("llama")
    data_dir = tmp_path_factory.mktemp("scale")
    with open_registry(data_dir, llama) as registry:
        for tenant in TENANTS:
            registry.create_tenant(tenant)
        files = [
            registry.upload("alice", f"seed{i}", native_files(llama.spec, 4, seed=i))
            for i in range(8)
        ]
        rows = [
            {
                "owner": TENANTS[i % len(TENANTS)],
                "name": f"p{i:05d}",
                "version": 1,
                "kind": "prefix_tuning",
                "num_virtual_tokens": 4,
                "bytes": files[i % len(files)].bytes,
                "sha256": files[i % len(files)].sha256,
                "model_fingerprint": registry.fingerprint,
                "visibility": "public" if i % 3 == 0 else "private",
                "description": "",
                "created_at": time.time(),
            }
            for i in range(COUNT)
        ]
        engine = open_engine(sqlite_url(data_dir))
        with engine.begin() as connection:
            connection.execute(insert(prefixes), rows)
        engine.dispose()
        yield registry


def query_plans(run) -> list[str]:
    """SQLite's plan for every SELECT on prefixes that `run` issues."""
    plans = []

    def explain(connection, cursor, statement, parameters, context, executemany):
        if statement.startswith("SELECT") and "FROM prefixes" in statement:
            rows = cursor.connection.execute(f"EXPLAIN QUERY PLAN {statement}", parameters)
            plans.append(" ".join(row[3] for row in rows))

    event.listen(Engine, "before_cursor_execute", explain)
    try:
        run()
    finally:
        event.remove(Engine, "before_cursor_execute", explain)
    return plans


def test_every_lookup_and_page_seeks_an_index(registry):
    resolve = query_plans(lambda: registry.resolve("bob/p00001", tenant="bob"))
    assert resolve == ["SEARCH prefixes USING INDEX ix_prefixes_live_name (owner=? AND name=?)"]
    for scope, index in [
        ("own", "ix_prefixes_live_name (owner=? AND name>?)"),
        ("public", "ix_prefixes_live_visibility (visibility=? AND (owner,name)>(?,?))"),
        ("all", "ix_prefixes_live_name ((owner,name)>(?,?))"),
    ]:

        def page(scope=scope):
            registry.list_prefixes(tenant="bob", scope=scope, limit=50, cursor="bob/p05001")

        assert query_plans(page) == [f"SEARCH prefixes USING INDEX {index}"]


def test_paging_through_ten_thousand_prefixes(registry):
    seen, cursor = [], None
    while True:
        page = registry.list_prefixes(tenant="bob", scope="all", limit=500, cursor=cursor)
        seen += [info.id for info in page.items]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    visible = sum(1 for i in range(COUNT) if i % 3 == 0 or TENANTS[i % len(TENANTS)] == "bob")
    assert len(seen) == len(set(seen)) == visible  # bob's own and everyone's public ones
    assert seen == sorted(seen)


def test_resolve_and_warm_acquire_among_ten_thousand(registry):
    """Correct answers here; their speed is measured by bench/registry.py (docs/benchmarks.md)."""
    refs = [f"{TENANTS[i % len(TENANTS)]}/p{i:05d}" for i in range(0, COUNT, 47)]
    owner = {ref: ref.split("/")[0] for ref in refs}

    for ref in refs:
        assert registry.resolve(ref, tenant=owner[ref]).id == ref
    for ref in refs:
        registry.acquire(ref, tenant=owner[ref]).release()  # cold: read from disk
    for ref in refs:
        with registry.acquire(ref, tenant=owner[ref]) as handle:  # warm: already resident
            assert handle.id == ref
    stats = registry.stats()
    assert stats.misses == 8  # the rows share 8 files: each is read from disk once
    assert stats.hits >= len(refs)
