"""The layers under the registry: stable file bytes, the content-addressed store, migrations."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError

from prefixes import PrefixKind
from prefixes.errors import CorruptBlob
from prefixes.formats.kinds import CompiledPrefix
from prefixes.storage.database import open_engine, sqlite_url
from prefixes.storage.kvfile import canonical_safetensors, decode_compiled, encode_compiled
from prefixes.storage.schema import SCHEMA_VERSION, migrate, prefixes, schema_version, tenants
from prefixes.storage.store import LOCK_SUFFIX, BlobStore, UploadStage


def shuffled_metadata(data: bytes) -> bytes:
    """The same safetensors file with its metadata keys in reverse order, as another process
    may write them (safetensors keeps them in a hash map)."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"] = dict(reversed(header["__metadata__"].items()))
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data[8 + length :]


def test_stored_bytes_do_not_depend_on_metadata_order():
    kv = torch.randn(2, 2, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    data = encode_compiled(CompiledPrefix(PrefixKind.PROMPT_TUNING, kv, "digest"), "fingerprint")
    assert shuffled_metadata(data) != data
    assert canonical_safetensors(shuffled_metadata(data)) == data
    assert (8 + struct.unpack("<Q", data[:8])[0]) % 8 == 0  # tensor data stays aligned
    assert torch.equal(decode_compiled(data), kv)


def test_bfloat16_kv_is_stored_in_bfloat16_and_read_back_exactly():
    kv = torch.randn(2, 2, 3, 4, 5).to(torch.bfloat16)
    data = encode_compiled(CompiledPrefix(PrefixKind.PREFIX_TUNING, kv, "digest"), "fingerprint")
    assert len(data) < kv.numel() * 4  # not widened to float32 on disk
    assert torch.equal(decode_compiled(data).to(torch.bfloat16), kv)


def test_publish_puts_a_file_under_its_sha256_and_read_checks_it(tmp_path):
    stages: list[UploadStage] = []
    store = BlobStore(tmp_path, stages.append)
    staged = store.stage(b"some tensor bytes")
    assert staged.temp_path.parent == store.workspace and staged.temp_path.exists()
    store.publish(staged)
    assert stages == [
        UploadStage.TEMP_WRITTEN,
        UploadStage.TEMP_SYNCED,
        UploadStage.BLOB_RENAMED,
    ]
    assert not staged.temp_path.exists()
    assert store.path(staged.sha256).parent.name == staged.sha256[:2]
    assert store.read(staged.sha256) == b"some tensor bytes"
    assert store.digests() == {staged.sha256}

    store.path(staged.sha256).write_bytes(b"some tensor bytez")
    with pytest.raises(CorruptBlob, match="do not match"):
        store.read(staged.sha256)
    store.publish(store.stage(b"some tensor bytes"))  # publishing the same bytes heals it
    assert store.read(staged.sha256) == b"some tensor bytes"
    store.remove(staged.sha256)
    with pytest.raises(CorruptBlob, match="missing"):
        store.read(staged.sha256)
    with pytest.raises(CorruptBlob, match="hex"):
        store.path("../../etc/passwd")
    store.close()


def test_sweeps_remove_dead_workspaces_and_unkept_blobs_only(tmp_path):
    live = BlobStore(tmp_path)
    mine = BlobStore(tmp_path)
    live_temp = live.stage(b"in flight")
    # What a killed process leaves: a workspace with a partial file, its lock no longer held.
    dead = tmp_path / "tmp" / "999-dead"
    dead.mkdir()
    (dead / "x.partial").write_bytes(b"half")
    (tmp_path / "tmp" / f"999-dead{LOCK_SUFFIX}").touch()
    (tmp_path / "tmp" / "998-lockless").mkdir()

    assert sorted(mine.sweep_temp()) == ["998-lockless", "999-dead"]
    assert not dead.exists()
    assert live_temp.temp_path.exists()  # its owner still holds the lock
    kept, dropped = mine.stage(b"kept"), mine.stage(b"dropped")
    mine.publish(kept)
    mine.publish(dropped)
    assert mine.sweep_blobs(keep={kept.sha256}) == [dropped.sha256]
    assert mine.digests() == {kept.sha256}

    live.close()
    assert not live.workspace.exists()
    assert sorted(os.listdir(tmp_path / "tmp")) == sorted(
        [mine.workspace.name, mine.workspace.name + LOCK_SUFFIX]
    )
    mine.close()


def test_migrations_run_once_and_a_newer_database_is_refused(tmp_path):
    engine = open_engine(sqlite_url(tmp_path))
    assert migrate(engine) == 0
    assert migrate(engine) == SCHEMA_VERSION
    with engine.begin() as connection:
        assert connection.execute(select(schema_version.c.version)).scalar_one() == SCHEMA_VERSION
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        connection.execute(update(schema_version).values(version=SCHEMA_VERSION + 1))
    with pytest.raises(RuntimeError, match="newer than this code"):
        migrate(engine)
    engine.dispose()


def test_one_live_version_per_name_is_enforced_by_the_database(tmp_path):
    engine = open_engine(sqlite_url(tmp_path))
    migrate(engine)
    row = {
        "owner": "alice", "name": "p", "kind": "prefix_tuning", "num_virtual_tokens": 1,
        "bytes": 1, "sha256": "0" * 64, "model_fingerprint": "f", "visibility": "private",
        "description": "", "created_at": 0.0,
    }  # fmt: skip
    with engine.begin() as connection:
        connection.execute(insert(tenants).values(name="alice", created_at=0.0))
        connection.execute(insert(prefixes).values(**row, version=1, retired_at=1.0))
        connection.execute(insert(prefixes).values(**row, version=2))
    with pytest.raises(IntegrityError), engine.begin() as connection:
        connection.execute(insert(prefixes).values(**row, version=3))
    engine.dispose()
