"""A release never waits for the database: it runs on the engine's thread, and the event loop
waits on the engine's lock, so a release stuck behind a writer would stall every tenant."""

from __future__ import annotations

import threading
from pathlib import Path

from prefixes.storage.database import write_transaction
from tests.registry_support import blob_files, native_files, open_registry
from tests.tiny import tiny_loaded


def test_releasing_a_retired_version_never_waits_for_the_write_lock(tmp_path: Path) -> None:
    loaded = tiny_loaded("llama")
    registry = open_registry(tmp_path / "data", loaded)
    try:
        registry.create_tenant("alice")
        kept = registry.upload("alice", "kept", native_files(loaded.spec, 3, seed=1))
        other = registry.upload("alice", "other", native_files(loaded.spec, 4, seed=2))
        handle = registry.acquire("kept", tenant="alice")
        registry.delete("kept", tenant="alice")  # pinned: its file waits for the release
        registry.delete("other", tenant="alice")
        writer_holds, writer_may_go = threading.Event(), threading.Event()

        def writer() -> None:  # another replica, or an upload, in its write transaction
            with write_transaction(registry.database):
                writer_holds.set()
                writer_may_go.wait(30)

        writing = threading.Thread(target=writer)
        writing.start()
        assert writer_holds.wait(10)
        # A collection waiting for the lock, holding the registry's collection lock meanwhile.
        collecting = threading.Thread(target=registry.serving.collect, args=(other.sha256,))
        collecting.start()
        releasing = threading.Thread(target=handle.release)
        releasing.start()
        releasing.join(10)
        released_while_locked = not releasing.is_alive()
        writer_may_go.set()
        for thread in (writing, collecting, releasing):
            thread.join(30)
        assert released_while_locked, "the release waited for the database's write lock"
        registry.drain()  # the deferred collection runs once the writer is done
        assert kept.sha256 not in blob_files(tmp_path / "data")
        assert other.sha256 not in blob_files(tmp_path / "data")
    finally:
        registry.close()
