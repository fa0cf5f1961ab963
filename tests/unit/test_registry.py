"""The registry's API on a tiny Llama: durability, versions and pinning, visibility, dedup.

Uploads are PEFT's own save_pretrained output (tests/tiny.make_adapter) or native files with
random KV; every prefix is served from what the registry stored, read back through `acquire`.
"""

from __future__ import annotations

import hashlib
import logging
import threading

import pytest
import torch

from prefixes import InvalidPrefix, PrefixError, PrefixKind, RawPrefix, read_upload, write_native
from prefixes.catalog.records import Scope, Visibility
from prefixes.errors import AlreadyExists, Incompatible, InvalidName, NotFound, PoolExhausted
from tests.registry_support import (
    MAX_VIRTUAL_TOKENS,
    blob_files,
    files_of,
    native_files,
    open_registry,
    peft_files,
)
from tests.tiny import make_adapter, tiny_loaded

# Each test runs on SQLite and on PostgreSQL (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("registry_backend")


@pytest.fixture(scope="module")
def llama():
    return tiny_loaded("llama")


@pytest.fixture(scope="module")
def adapters(llama, tmp_path_factory):
    """PEFT files for a prompt-tuning and a prefix-tuning adapter."""
    root = tmp_path_factory.mktemp("adapters")
    make_adapter(llama.model, "prompt", 5, root / "prompt", seed=1)
    make_adapter(llama.model, "prefix", 4, root / "prefix", seed=2)
    return {kind: peft_files(root / kind) for kind in ("prompt", "prefix")}


@pytest.fixture
def registry(llama, tmp_path):
    registry = open_registry(tmp_path / "data", llama)
    registry.create_tenant("alice")
    registry.create_tenant("bob")
    yield registry
    registry.close()


def compiled_kv(llama, files):
    return llama.compile(read_upload(files), MAX_VIRTUAL_TOKENS).kv


def test_upload_close_reopen_serves_identical_tensors_and_metadata(
    llama, adapters, tmp_path, registry
):
    uploaded = {
        kind: registry.upload("alice", kind, files, description=f"a {kind} adapter")
        for kind, files in adapters.items()
    }
    registry.close()

    with open_registry(tmp_path / "data", llama) as reopened:
        for kind, files in adapters.items():
            info = reopened.get(kind, tenant="alice")
            assert info == uploaded[kind]
            with reopened.acquire(f"alice/{kind}", tenant="alice") as handle:
                assert torch.equal(handle.prefix.kv, compiled_kv(llama, files))
                assert handle.prefix.kind == info.kind
            # Two files: the compiled KV and the prefix's own parameters, both counted.
            stored = [
                tmp_path / "data" / "blobs" / sha256[:2] / f"{sha256}.safetensors"
                for sha256 in (info.sha256, info.parameters_sha256)
                if sha256 is not None
            ]
            assert len(stored) == 2
            assert hashlib.sha256(stored[0].read_bytes()).hexdigest() == info.sha256
            assert sum(path.stat().st_size for path in stored) == info.bytes
            assert torch.equal(reopened.parameters(info).tensor, read_upload(files).tensor)
    assert uploaded["prompt"].kind is PrefixKind.PROMPT_TUNING
    assert uploaded["prefix"].kind is PrefixKind.PREFIX_TUNING
    assert uploaded["prompt"].num_virtual_tokens == 5
    assert uploaded["prompt"].to_dict()["id"] == "alice/prompt"


def test_overwrite_makes_a_new_version_and_a_pinned_handle_keeps_the_old_one(
    llama, registry, tmp_path
):
    spec = llama.spec
    first = registry.upload("alice", "pirate", native_files(spec, 4, seed=1))
    with pytest.raises(AlreadyExists, match="overwrite"):
        registry.upload("alice", "pirate", native_files(spec, 4, seed=2))
    old = registry.acquire("pirate", tenant="alice")
    old_kv = old.prefix.kv.clone()

    second = registry.upload("alice", "pirate", native_files(spec, 4, seed=2), overwrite=True)
    assert (first.version, second.version) == (1, 2)
    assert registry.get("pirate", tenant="alice").version == 2
    with registry.acquire("pirate", tenant="alice") as new:
        assert new.version == 2
        assert not torch.equal(new.prefix.kv, old_kv)
    assert old.version == 1 and torch.equal(old.prefix.kv, old_kv)
    assert first.sha256 in blob_files(tmp_path / "data")  # pinned: kept on disk and device
    assert (registry.stats().device_entries, registry.stats().pinned_entries) == (2, 1)

    old.release()
    registry.drain()  # the last release deletes the file in the background
    assert first.sha256 not in blob_files(tmp_path / "data")
    assert (registry.stats().device_entries, registry.stats().host_entries) == (1, 0)
    # The old version's parameters went at the overwrite: nothing pins them.
    assert blob_files(tmp_path / "data") == files_of(second)


def test_delete_hides_at_once_and_frees_the_file_when_the_last_handle_goes(
    llama, registry, tmp_path
):
    info = registry.upload("alice", "pirate", native_files(llama.spec, 4, seed=1))
    handle = registry.acquire("pirate", tenant="alice")
    registry.delete("pirate", tenant="alice")

    with pytest.raises(NotFound):
        registry.get("pirate", tenant="alice")
    with pytest.raises(NotFound):
        registry.acquire("pirate", tenant="alice")
    assert registry.list_prefixes(tenant="alice").items == []
    assert info.sha256 in blob_files(tmp_path / "data")
    assert handle.prefix.kv.shape[3] == 4

    handle.release()
    handle.release()  # idempotent
    registry.drain()
    assert info.sha256 not in blob_files(tmp_path / "data")
    with pytest.raises(NotFound):
        registry.delete("pirate", tenant="alice")


def test_versions_keep_rising_after_a_delete(llama, registry):
    registry.upload("alice", "pirate", native_files(llama.spec, 4, seed=1))
    registry.delete("pirate", tenant="alice")
    again = registry.upload("alice", "pirate", native_files(llama.spec, 4, seed=1))
    assert again.version == 2  # (id, version) never names two different uploads


def test_private_prefixes_are_not_found_by_others_public_ones_are(llama, registry):
    registry.upload("alice", "secret", native_files(llama.spec, 4, seed=1))
    public = registry.upload(
        "alice", "shared", native_files(llama.spec, 4, seed=2), visibility="public"
    )
    with pytest.raises(NotFound) as hidden:
        registry.get("alice/secret", tenant="bob")
    with pytest.raises(NotFound) as missing:
        registry.get("alice/nothing", tenant="bob")
    # The same answer whether it exists or not: existence is not disclosed.
    assert str(hidden.value).replace("secret", "X") == str(missing.value).replace("nothing", "X")
    with pytest.raises(NotFound):
        registry.acquire("alice/secret", tenant="bob")
    with pytest.raises(NotFound):
        registry.get("secret", tenant="bob")  # a bare name is bob's own

    assert registry.get("alice/shared", tenant="bob") == public
    with registry.acquire("alice/shared", tenant="bob") as handle:
        assert handle.id == "alice/shared"
    with pytest.raises(NotFound):
        registry.delete("alice/shared", tenant="bob")  # only the owner deletes
    assert registry.get("alice/shared", tenant="alice").visibility is Visibility.PUBLIC


def test_list_scopes_and_pages(llama, registry):
    for i in range(7):
        visibility = "public" if i % 2 else "private"
        registry.upload(
            "alice", f"a{i}", native_files(llama.spec, 2, seed=i), visibility=visibility
        )
    registry.upload("bob", "b0", native_files(llama.spec, 2, seed=100))

    def ids(scope, tenant="bob", limit=3):
        seen, cursor = [], None
        while True:
            page = registry.list_prefixes(tenant=tenant, scope=scope, limit=limit, cursor=cursor)
            assert len(page.items) <= limit
            seen += [info.id for info in page.items]
            if page.next_cursor is None:
                return seen
            cursor = page.next_cursor

    assert ids(Scope.OWN) == ["bob/b0"]
    assert ids("public") == ["alice/a1", "alice/a3", "alice/a5"]
    assert ids("all") == ["alice/a1", "alice/a3", "alice/a5", "bob/b0"]
    assert ids("own", tenant="alice") == [f"alice/a{i}" for i in range(7)]
    assert ids("own", tenant="alice", limit=7) == [f"alice/a{i}" for i in range(7)]
    with pytest.raises(InvalidPrefix, match="scope"):
        registry.list_prefixes(tenant="bob", scope="everything")
    with pytest.raises(InvalidPrefix, match="limit"):
        registry.list_prefixes(tenant="bob", limit=0)


def test_identical_bytes_share_one_file_until_the_last_user_deletes(adapters, registry, tmp_path):
    mine = registry.upload("alice", "pirate", adapters["prompt"])
    theirs = registry.upload("bob", "corsair", adapters["prompt"])
    assert files_of(mine) == files_of(theirs)
    assert blob_files(tmp_path / "data") == files_of(mine)
    with (
        registry.acquire("pirate", tenant="alice") as a,
        registry.acquire("corsair", tenant="bob") as b,
    ):
        assert a.prefix.kv.data_ptr() == b.prefix.kv.data_ptr()  # one copy in the pool
        assert registry.stats().device_entries == 1

    registry.delete("pirate", tenant="alice")
    assert blob_files(tmp_path / "data") == files_of(mine)
    with registry.acquire("corsair", tenant="bob") as b:
        assert b.version == 1
    registry.delete("corsair", tenant="bob")
    assert blob_files(tmp_path / "data") == set()


def test_a_prefix_compiled_for_another_model_is_reported_and_refused(
    llama, adapters, registry, tmp_path, caplog
):
    registry.upload("alice", "pirate", adapters["prompt"])
    registry.close()
    other = tiny_loaded("llama", seed=1)  # same geometry, other weights

    with caplog.at_level(logging.WARNING), open_registry(tmp_path / "data", other) as moved:
        assert "alice/pirate v1" in caplog.text
        assert [info.id for info in moved.incompatible_prefixes()] == ["alice/pirate"]
        info = moved.get("pirate", tenant="alice")  # metadata stays readable
        assert not info.compatible
        with pytest.raises(Incompatible, match="upload it again"):
            moved.acquire("pirate", tenant="alice")
        with pytest.raises(Incompatible):
            moved.resolve("pirate", tenant="alice")
        assert moved.stats().misses == 0  # never even loaded
        fresh = moved.upload("alice", "pirate", adapters["prompt"], overwrite=True)
        assert fresh.compatible and moved.incompatible_prefixes() == []

    with open_registry(tmp_path / "data", llama) as back:  # now v2 is the foreign one
        assert not back.get("pirate", tenant="alice").compatible
        with pytest.raises(Incompatible):
            back.acquire("pirate", tenant="alice")


def test_invalid_uploads_leave_nothing_behind(llama, registry, tmp_path):
    good = native_files(llama.spec, 4, seed=1)
    kv = read_upload(good).tensor
    kv[0, 0, 0, 0, 0] = float("nan")
    with_nan = {"p.safetensors": write_native(RawPrefix(PrefixKind.PREFIX_TUNING, kv))}

    with pytest.raises(InvalidPrefix, match="NaN"):
        registry.upload("alice", "nan", with_nan)
    with pytest.raises(PrefixError):
        registry.upload("alice", "pickle", {"adapter_model.bin": b"\x80\x04"})
    with pytest.raises(InvalidName):
        registry.upload("alice", "Bad Name", good)
    with pytest.raises(NotFound, match="tenant"):
        registry.upload("carol", "pirate", good)
    assert blob_files(tmp_path / "data") == set()
    assert registry.list_prefixes(tenant="alice").items == []


def test_concurrent_acquires_of_one_cold_prefix_load_it_once(llama, registry):
    registry.upload("alice", "pirate", native_files(llama.spec, 8, seed=1))
    registry.close()
    handles, barrier = [], threading.Barrier(6)

    with open_registry(registry.data_dir, llama) as cold:

        def acquire():
            barrier.wait()
            handles.append(cold.acquire("alice/pirate", tenant="alice"))

        threads = [threading.Thread(target=acquire) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        stats = cold.stats()
        assert (stats.misses, stats.hits, stats.pinned_entries) == (1, 5, 1)
        assert len({handle.prefix.kv.data_ptr() for handle in handles}) == 1
        for handle in handles:
            handle.release()
        assert cold.stats().pinned_entries == 0


def test_a_full_pool_refuses_until_a_handle_is_released(llama, tmp_path):
    spec = llama.spec
    one_prefix = spec.kv_bytes_per_token * 4
    with open_registry(tmp_path / "data", llama, device_pool_bytes=one_prefix) as registry:
        registry.create_tenant("alice")
        registry.upload("alice", "a", native_files(spec, 4, seed=1))
        registry.upload("alice", "b", native_files(spec, 4, seed=2))
        with pytest.raises(InvalidPrefix, match="device pool"):
            registry.upload("alice", "huge", native_files(spec, 5, seed=3))
        held = registry.acquire("a", tenant="alice")
        with pytest.raises(PoolExhausted, match="pinned"):
            registry.acquire("b", tenant="alice")
        held.release()
        with registry.acquire("b", tenant="alice") as handle:
            assert handle.id == "alice/b"
        assert registry.stats().evictions == 1
