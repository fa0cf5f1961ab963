"""The registry's serving side: pinned handles to compiled KV, the device and host pool, and the
collection of files that nothing uses any more.

It finds versions through the catalog and reads files from the store it shares with uploads; it
never writes metadata. A file goes only when no live version names it and nothing pins it: the
database answers the first under its write lock (so no upload can commit a row naming the file
in between), the pool the second under its own lock (so no pin can start in between).

Thread-safe: the HTTP layer and the engine thread may call any method concurrently.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from functools import partial
from types import TracebackType

import torch

from prefixes.catalog import versions
from prefixes.catalog.catalog import Catalog
from prefixes.catalog.records import PrefixInfo
from prefixes.errors import CorruptBlob, InvalidPrefix
from prefixes.formats.kinds import CompiledPrefix
from prefixes.storage import deletions
from prefixes.storage.database import write_transaction
from prefixes.storage.kvfile import decode_compiled
from prefixes.storage.pool import PoolStats, PrefixPool
from prefixes.storage.store import BlobStore

log = logging.getLogger(__name__)


# Called with the version about to be pinned; raising refuses it before anything is loaded.
BeforePin = Callable[[PrefixInfo], None]


class PrefixHandle:
    """One pinned version of a prefix. Until `release`, its KV stays on the device and its file
    on disk, whatever happens to the name (delete, overwrite)."""

    __slots__ = ("_lock", "_release", "_released", "info", "prefix")

    def __init__(
        self, info: PrefixInfo, prefix: CompiledPrefix, release: Callable[[], None]
    ) -> None:
        self.info = info
        self.prefix = prefix
        self._release = release
        self._released = False
        self._lock = threading.Lock()

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def version(self) -> int:
        return self.info.version

    def release(self) -> None:
        """Unpin; calling it again does nothing."""
        with self._lock:
            if self._released:
                return
            self._released = True
        self._release()

    def __enter__(self) -> PrefixHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self._released else "pinned"
        return f"PrefixHandle({self.id!r}, version={self.version}, {state})"


class Serving:
    def __init__(
        self,
        catalog: Catalog,
        store: BlobStore,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        device_pool_bytes: int,
        host_pool_bytes: int,
        file_grace: float = 0.0,
    ) -> None:
        """Opening sweeps what a crash left behind (see `_sweep_orphans`).

        `file_grace` > 0: the store is shared with other replicas, which may have resolved a
        version just before it was deleted and still be reading its file; a file no live version
        names is then deleted `file_grace` seconds later, by whichever replica sweeps first
        (prefixes/storage/deletions.py), instead of at once."""
        self._catalog = catalog
        self._store = store
        self._dtype = dtype  # stored KV is cast to the model's dtype on load
        self._pool = PrefixPool(device_pool_bytes, host_pool_bytes, device)
        # Files of retired versions that were pinned when retired: collected at the last release.
        self._collect_lock = threading.Lock()
        self._awaiting_release: set[str] = set()
        # One thread, so work runs in submission order and `drain` can wait for all of it.
        self._background = ThreadPoolExecutor(1, thread_name_prefix="prefix-registry")
        self._file_grace = file_grace
        self._closed = threading.Event()
        self._sweep_orphans()
        self._sweeper: threading.Thread | None = None
        if file_grace > 0:
            self._sweeper = threading.Thread(target=self._sweep_periodically, daemon=True)
            self._sweeper.start()

    def close(self) -> None:
        self._closed.set()
        if self._sweeper is not None:  # a sweep under way finishes before the database closes
            self._sweeper.join()
        self._background.shutdown(wait=True, cancel_futures=True)

    def acquire(
        self, ref: str, *, tenant: str, before_pin: BeforePin | None = None
    ) -> PrefixHandle:
        """Pin the current version's KV on the device and return a handle to it.

        May read from disk on a miss: call it from a worker thread, not the engine's loop.
        Raises NotFound, Incompatible, or PoolExhausted when pinned prefixes fill the pool.
        `before_pin` sees the resolved version before anything is loaded or evicted for it, and
        may refuse it by raising (the server's per-tenant budget does).
        """
        info = self._catalog.resolve(ref, tenant=tenant)
        if before_pin is not None:
            before_pin(info)
        try:
            kv = self._pool.pin(info.sha256, partial(self._load, info.sha256))
        except CorruptBlob:
            if self._catalog.is_current(info):
                raise
            # Deleted or replaced between resolving and loading: the file went with it.
            info = self._catalog.resolve(ref, tenant=tenant)
            if before_pin is not None:
                before_pin(info)
            kv = self._pool.pin(info.sha256, partial(self._load, info.sha256))
        return PrefixHandle(
            info, CompiledPrefix(info.kind, kv, info.sha256), partial(self._release, info.sha256)
        )

    def check_fits(self, nbytes: int) -> None:
        """Refuse, at upload, compiled KV larger than the whole device pool."""
        if nbytes > self._pool.device_budget_bytes:
            raise InvalidPrefix(
                "bytes",
                f"at most {self._pool.device_budget_bytes} (the device pool's budget)",
                nbytes,
                "it could never be loaded",
            )

    def collect(self, sha256: str) -> None:
        """Delete a file and its resident KV if no live version refers to it and nothing pins it;
        if something pins it, the last release collects it.

        Runs under the database's write lock, so an upload of the same bytes cannot publish
        between our check and the unlink; the pool drops the entry and the file under its own
        lock, so a pin cannot slip in between either.
        """
        with self._collect_lock, write_transaction(self._catalog.database) as connection:
            if self._file_grace > 0 and not versions.is_referenced(connection, sha256):
                # Other replicas may still read the file: it goes later (sweep_due); our own
                # copy goes now, or at its last release here.
                deletions.schedule(connection, sha256, time.time() + self._file_grace)
                gone = self._pool.discard(sha256)
            else:
                gone = versions.is_referenced(connection, sha256) or self._pool.discard(
                    sha256, partial(self._store.remove, sha256)
                )
            if gone:
                self._awaiting_release.discard(sha256)
            else:  # pinned: the last release collects it
                self._awaiting_release.add(sha256)

    def sweep_due(self) -> list[str]:
        """Delete the scheduled files whose grace period is over and that no live version names
        again; return their digests. Under the write lock, like `collect`."""
        removed = []
        with self._collect_lock, write_transaction(self._catalog.database) as connection:
            due = deletions.due(connection, time.time())
            deletions.cancel(connection, due)
            for sha256 in due:
                if not versions.is_referenced(connection, sha256):
                    self._pool.discard(sha256)
                    self._store.remove(sha256)
                    removed.append(sha256)
        return removed

    def drain(self) -> None:
        """Wait for background work submitted so far: the file deletions that the last release
        of a deleted or replaced version started."""
        self._background.submit(lambda: None).result()

    def stats(self) -> PoolStats:
        return self._pool.stats()

    def _load(self, sha256: str) -> torch.Tensor:
        return decode_compiled(self._store.read(sha256)).to(self._dtype)

    def _release(self, sha256: str) -> None:
        """Unpin. Releases come from the engine's thread, which must never wait for the
        database: even whether a retired version awaits its last release is asked in the
        background, since a running collection holds that lock while it waits for the
        database's write lock."""
        if self._pool.unpin(sha256) == 0:
            # After close the executor refuses work; the next open sweeps the file instead.
            with suppress(RuntimeError):
                self._background.submit(self._collect_if_awaiting, sha256)

    def _collect_if_awaiting(self, sha256: str) -> None:
        with self._collect_lock:
            awaiting = sha256 in self._awaiting_release
        if awaiting:
            self.collect(sha256)

    def _sweep_orphans(self) -> None:
        """Remove what a crash left: temp files, and files no live version refers to."""
        removed_temp = self._store.sweep_temp()
        with write_transaction(self._catalog.database) as connection:
            live = versions.live_digests(connection)
            if self._file_grace > 0:
                # A file no row names may belong to a version another replica just retired:
                # it waits out the grace period like any other.
                due_at = time.time() + self._file_grace
                for sha256 in self._store.digests() - live - deletions.scheduled(connection):
                    deletions.schedule(connection, sha256, due_at)
                removed = []
            else:
                removed = self._store.sweep_blobs(keep=live)
                deletions.cancel_all(connection)  # every file they name is gone or live again
        removed += self.sweep_due() if self._file_grace > 0 else []
        if removed_temp or removed:
            log.info(
                "registry: swept %d temp workspaces and %d unreferenced files",
                len(removed_temp),
                len(removed),
            )

    def _sweep_periodically(self) -> None:
        interval = min(max(self._file_grace / 4, 1.0), 30.0)
        while not self._closed.wait(interval):
            try:
                self.sweep_due()
            except Exception:  # the database may be away for a while: try again next time
                log.exception("registry: sweeping files past their grace period failed")
