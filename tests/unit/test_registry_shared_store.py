"""Replicas sharing one prefix store: a deleted prefix's file outlives the delete by the grace
period, for replicas that resolved it just before, then the first replica to sweep removes it.

Two registries on one database and one store directory stand for two replicas. The clock of
the serving side is the test's, so nothing waits for real time.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

import prefixes.storage.serving as serving
from prefixes.catalog.catalog import Catalog
from prefixes.errors import NotFound
from prefixes.registry import Registry
from tests.registry_support import blob_files, files_of, native_files, open_registry
from tests.tiny import tiny_loaded

GRACE = 60.0


@pytest.fixture(scope="module")
def llama():
    return tiny_loaded("llama")


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [1_000_000.0]
    monkeypatch.setattr(serving, "time", SimpleNamespace(time=lambda: now[0]))
    return now


@pytest.fixture
def replicas(llama, tmp_path: Path, clock):
    store = tmp_path / "store"
    opened: list[Registry] = []

    def open_replica(name: str) -> Registry:
        replica = open_registry(
            tmp_path / name,
            llama,
            database_url=f"sqlite:///{tmp_path / 'shared.sqlite3'}",
            store_dir=store,
            file_grace=GRACE,
        )
        opened.append(replica)
        return replica

    yield open_replica, store
    for replica in opened:
        replica.close()


def test_a_deleted_prefix_file_stays_for_the_grace_period_then_goes(llama, replicas, clock):
    open_replica, store = replicas
    first, second = open_replica("a"), open_replica("b")
    first.create_tenant("alice")
    info = first.upload("alice", "pirate", native_files(llama.spec, 3, seed=1))
    assert blob_files(store) == files_of(info)  # the store, not the data directory, holds it
    assert blob_files(first.data_dir) == set()
    with second.acquire("alice/pirate", tenant="alice") as handle:
        assert handle.prefix.kv.shape[3] == 3

    first.delete("pirate", tenant="alice")
    with pytest.raises(NotFound):  # gone for every replica at once
        second.acquire("alice/pirate", tenant="alice")
    assert blob_files(store) == files_of(info)  # but a replica still loading it finds the file
    assert second.serving.sweep_due() == []

    clock[0] += GRACE
    assert set(second.serving.sweep_due()) == files_of(info)
    assert blob_files(store) == set()


def test_uploading_the_same_bytes_again_within_the_grace_period_keeps_the_file(
    llama, replicas, clock
):
    open_replica, store = replicas
    first, second = open_replica("a"), open_replica("b")
    first.create_tenant("alice")
    files = native_files(llama.spec, 3, seed=2)
    info = first.upload("alice", "pirate", files)
    first.delete("pirate", tenant="alice")
    again = second.upload("alice", "copy", files)
    assert again.sha256 == info.sha256

    clock[0] += GRACE
    assert first.serving.sweep_due() == []
    assert blob_files(store) == files_of(info)
    with first.acquire("alice/copy", tenant="alice") as handle:
        assert handle.prefix.kv.shape[3] == 3


def test_a_replica_opening_schedules_unreferenced_files_instead_of_removing_them(
    llama, replicas, clock
):
    open_replica, store = replicas
    first = open_replica("a")
    first.create_tenant("alice")
    info = first.upload("alice", "pirate", native_files(llama.spec, 3, seed=3))
    # Retired by another replica that stopped before collecting: the file has no live row and
    # no scheduled deletion.
    Catalog.delete(first, "pirate", tenant="alice")  # the catalog's delete alone: no collection
    assert blob_files(store) == files_of(info)

    late = open_replica("b")  # may be the one still loading it: the file must stay a while
    assert blob_files(store) == files_of(info)
    clock[0] += GRACE
    assert set(late.serving.sweep_due()) == files_of(info)
    assert blob_files(store) == set()
