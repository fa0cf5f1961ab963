"""The prefix registry: tenants and keys, durable versioned prefixes, pinned handles to their KV.

Layers, each in its own module: `schema` (tables, migrations), `tenants` (tenants, API keys),
`store` (content-addressed files), `kvfile` (the stored form of compiled KV), `pool` (device and
host tiers). This module ties them together; docs/registry.md gives the whole picture.

Thread-safe: the HTTP layer and the engine thread may call any method concurrently.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from sqlalchemy import (
    Connection,
    Row,
    exists,
    func,
    insert,
    literal,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.exc import IntegrityError

from prefixes import tenants as tenant_rows
from prefixes.database import open_engine, read_transaction, sqlite_url, write_transaction
from prefixes.errors import (
    AlreadyExists,
    CorruptBlob,
    Incompatible,
    InvalidPrefix,
    NotFound,
    QuotaExceeded,
)
from prefixes.formats import read_upload
from prefixes.kinds import CompiledPrefix, PrefixKind, RawPrefix
from prefixes.kvfile import decode_compiled, encode_compiled
from prefixes.names import check_name, parse_ref
from prefixes.pool import PoolStats, PrefixPool
from prefixes.records import (
    DEFAULT_QUOTAS,
    IssuedKey,
    KeyInfo,
    Page,
    PrefixInfo,
    Quotas,
    Scope,
    Tenant,
    Usage,
    Visibility,
    timestamp,
)
from prefixes.schema import migrate, prefixes
from prefixes.spec import ModelSpec
from prefixes.store import BlobStore, StageHook, UploadStage

log = logging.getLogger(__name__)

# Validates a raw prefix against the loaded model and compiles it to KV on the model's device.
Compiler = Callable[[RawPrefix], CompiledPrefix]

MAX_DESCRIPTION = 1024
MAX_PAGE = 1000
_live = prefixes.c.retired_at.is_(None)


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


class Registry:
    def __init__(
        self,
        data_dir: Path | str,
        *,
        spec: ModelSpec,
        compiler: Compiler,
        max_virtual_tokens: int,
        device: torch.device | str = "cpu",
        database_url: str | None = None,
        device_pool_bytes: int = 256 << 20,
        host_pool_bytes: int = 1 << 30,
        default_quotas: Quotas = DEFAULT_QUOTAS,
        on_stage: StageHook | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.spec = spec
        self.fingerprint = spec.fingerprint()
        self.max_virtual_tokens = max_virtual_tokens
        self.default_quotas = default_quotas
        self._compiler = compiler
        self._dtype = getattr(torch, spec.dtype)
        self._on_stage = on_stage or (lambda stage: None)
        self._engine = open_engine(database_url or sqlite_url(self.data_dir))
        migrate(self._engine)
        self._store = BlobStore(self.data_dir, on_stage)
        self._pool = PrefixPool(device_pool_bytes, host_pool_bytes, device)
        # Files of retired versions that were pinned when retired: collected at the last release.
        self._collect_lock = threading.Lock()
        self._awaiting_release: set[str] = set()
        # One thread, so work runs in submission order and `drain` can wait for all of it.
        self._background = ThreadPoolExecutor(1, thread_name_prefix="prefix-registry")
        self._sweep_orphans()
        self._report_incompatible()

    def close(self) -> None:
        self._background.shutdown(wait=True, cancel_futures=True)
        self._store.close()
        self._engine.dispose()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # Tenants and keys ---------------------------------------------------------------------

    def create_tenant(self, name: str, quotas: Quotas | None = None) -> IssuedKey:
        """Create a tenant with its first API key (shown once: only its hash is kept)."""
        with write_transaction(self._engine) as connection:
            tenant_rows.create_tenant(connection, name, quotas or Quotas())
            return tenant_rows.issue_key(connection, name)

    def get_tenant(self, name: str) -> Tenant:
        with read_transaction(self._engine) as connection:
            return tenant_rows.get_tenant(connection, name, self.default_quotas)

    def set_quotas(self, name: str, quotas: Quotas) -> Tenant:
        """Replace a tenant's own quotas (None fields follow the registry's defaults)."""
        with write_transaction(self._engine) as connection:
            tenant_rows.set_quotas(connection, name, quotas)
            return tenant_rows.get_tenant(connection, name, self.default_quotas)

    def usage(self, name: str) -> Usage:
        with read_transaction(self._engine) as connection:
            tenant_rows.get_tenant(connection, name, self.default_quotas)
            return tenant_rows.usage(connection, name)

    def issue_key(self, tenant: str) -> IssuedKey:
        with write_transaction(self._engine) as connection:
            tenant_rows.get_tenant(connection, tenant, self.default_quotas)
            return tenant_rows.issue_key(connection, tenant)

    def revoke_key(self, tenant: str, key_id: str) -> None:
        with write_transaction(self._engine) as connection:
            tenant_rows.revoke_key(connection, tenant, key_id)

    def list_keys(self, tenant: str) -> list[KeyInfo]:
        with read_transaction(self._engine) as connection:
            return tenant_rows.list_keys(connection, tenant)

    def authenticate(self, api_key: str) -> str:
        """The name of the tenant owning this key; Unauthorized if unknown or revoked."""
        with read_transaction(self._engine) as connection:
            return tenant_rows.authenticate(connection, api_key)

    # Prefixes -----------------------------------------------------------------------------

    def upload(
        self,
        tenant: str,
        name: str,
        files: Mapping[str, bytes],
        *,
        visibility: Visibility | str | None = None,
        description: str = "",
        overwrite: bool = False,
    ) -> PrefixInfo:
        """Read, validate, compile, store and commit: servable when this returns.

        With `overwrite`, an existing name gets a new version; requests holding the old one keep
        it. A crash at any point leaves either the whole new version or nothing visible.
        Without `visibility`, a new prefix is private and a new version keeps the previous one's.
        """
        check_name(name, "name")
        chosen = None if visibility is None else Visibility.parse(visibility)
        if len(description) > MAX_DESCRIPTION:
            raise InvalidPrefix(
                "description", f"at most {MAX_DESCRIPTION} characters", len(description)
            )
        with read_transaction(self._engine) as connection:  # cheap refusals before compiling
            owner = tenant_rows.get_tenant(connection, tenant, self.default_quotas)
            previous = self._live_row(connection, tenant, name)
            self._check_replace(tenant, name, previous, overwrite)
            self._check_quotas(connection, owner, previous, new_bytes=0)
        raw = read_upload(files)
        limit = owner.quotas.max_virtual_tokens
        if limit is not None and raw.num_virtual_tokens > limit:
            raise QuotaExceeded(tenant, "max_virtual_tokens", limit, raw.num_virtual_tokens)
        compiled = self._compiler(raw)
        if compiled.nbytes > self._pool.device_budget_bytes:
            raise InvalidPrefix(
                "bytes",
                f"at most {self._pool.device_budget_bytes} (the device pool's budget)",
                compiled.nbytes,
                "it could never be loaded",
            )
        staged = self._store.stage(encode_compiled(compiled, self.fingerprint))
        try:
            with write_transaction(self._engine) as connection:
                owner = tenant_rows.get_tenant(connection, tenant, self.default_quotas)
                previous = self._live_row(connection, tenant, name)
                self._check_replace(tenant, name, previous, overwrite)
                self._check_quotas(connection, owner, previous, new_bytes=staged.size)
                # Published under the write lock: a concurrent collection of the same bytes
                # either ran before (and we put the file back) or waits for our commit.
                self._store.publish(staged)
                visibility = chosen or (
                    Visibility.parse(previous.visibility) if previous else Visibility.PRIVATE
                )
                info = self._insert_version(
                    connection, owner.name, name, previous, compiled, staged.sha256,
                    staged.size, visibility, description,
                )  # fmt: skip
                self._on_stage(UploadStage.ROW_WRITTEN)
        except IntegrityError:  # another replica took the name between our check and insert
            self._store.discard(staged)
            self._collect(staged.sha256)
            raise AlreadyExists(f"prefix {tenant}/{name} was created concurrently") from None
        except BaseException:
            self._store.discard(staged)
            self._collect(staged.sha256)  # published but not committed: nothing refers to it
            raise
        self._on_stage(UploadStage.COMMITTED)
        if previous is not None and previous.sha256 != info.sha256:
            self._collect(previous.sha256)
        return info

    def get(self, ref: str, *, tenant: str) -> PrefixInfo:
        """Metadata of a prefix the tenant may see (its own, or public); NotFound otherwise."""
        owner, name = parse_ref(ref, tenant)
        with read_transaction(self._engine) as connection:
            row = self._live_row(connection, owner, name)
        if row is None or (owner != tenant and row.visibility != Visibility.PUBLIC):
            raise NotFound(f"prefix {owner}/{name} not found", field="prefix")
        return self._info(row)

    def resolve(self, ref: str, *, tenant: str) -> PrefixInfo:
        """Like `get`, for serving: also refuses a prefix compiled against another model."""
        info = self.get(ref, tenant=tenant)
        if not info.compatible:
            raise Incompatible(
                f"prefix {info.id} v{info.version} was compiled for base model "
                f"{info.model_fingerprint}, the loaded model is {self.fingerprint}: "
                "upload it again to serve it on this model",
                field="prefix",
            )
        return info

    def list_prefixes(
        self,
        *,
        tenant: str,
        scope: Scope | str = Scope.ALL,
        limit: int = 100,
        cursor: str | None = None,
    ) -> Page:
        """Live prefixes visible to the tenant in `owner/name` order, a page at a time."""
        scope = Scope.parse(scope)
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidPrefix("limit", f"between 1 and {MAX_PAGE}", limit)
        public = prefixes.c.visibility == Visibility.PUBLIC.value
        visible = {
            Scope.OWN: prefixes.c.owner == tenant,
            Scope.PUBLIC: public,
            Scope.ALL: or_(prefixes.c.owner == tenant, public),
        }[scope]
        query = select(prefixes).where(_live, visible)
        if cursor:
            owner, name = parse_ref(cursor, tenant)
            if scope is Scope.OWN and owner == tenant:  # lets the index seek to the name
                query = query.where(prefixes.c.name > name)
            else:
                after = tuple_(literal(owner), literal(name))
                query = query.where(tuple_(prefixes.c.owner, prefixes.c.name) > after)
        query = query.order_by(prefixes.c.owner, prefixes.c.name).limit(limit + 1)
        with read_transaction(self._engine) as connection:
            rows = connection.execute(query).all()
        items = [self._info(row) for row in rows[:limit]]
        return Page(items, items[-1].id if len(rows) > limit else None)

    def delete(self, ref: str, *, tenant: str) -> None:
        """Hide the prefix at once (owner only: anyone else gets NotFound). Requests holding it
        keep it; its file goes when nothing uses it."""
        owner, name = parse_ref(ref, tenant)
        if owner != tenant:
            raise NotFound(f"prefix {owner}/{name} not found", field="prefix")
        with write_transaction(self._engine) as connection:
            row = self._live_row(connection, owner, name)
            if row is None:
                raise NotFound(f"prefix {owner}/{name} not found", field="prefix")
            connection.execute(
                update(prefixes).where(prefixes.c.id == row.id).values(retired_at=time.time())
            )
        self._collect(row.sha256)

    def incompatible_prefixes(self) -> list[PrefixInfo]:
        """Live prefixes compiled against another base model: listed, never served."""
        query = select(prefixes).where(_live, prefixes.c.model_fingerprint != self.fingerprint)
        with read_transaction(self._engine) as connection:
            rows = connection.execute(query.order_by(prefixes.c.owner, prefixes.c.name)).all()
        return [self._info(row) for row in rows]

    # Serving ------------------------------------------------------------------------------

    def acquire(self, ref: str, *, tenant: str) -> PrefixHandle:
        """Pin the current version's KV on the device and return a handle to it.

        May read from disk on a miss: call it from a worker thread, not the engine's loop.
        Raises NotFound, Incompatible, or PoolExhausted when pinned prefixes fill the pool.
        """
        info = self.resolve(ref, tenant=tenant)
        try:
            kv = self._pool.pin(info.sha256, partial(self._load, info.sha256))
        except CorruptBlob:
            if self._is_live(info):
                raise
            # Deleted or replaced between resolving and loading: the file went with it.
            info = self.resolve(ref, tenant=tenant)
            kv = self._pool.pin(info.sha256, partial(self._load, info.sha256))
        return PrefixHandle(
            info, CompiledPrefix(info.kind, kv), partial(self._release, info.sha256)
        )

    def prefetch(self, ref: str, *, tenant: str) -> Future[None]:
        """Start loading a prefix to the device in the background, without pinning it."""
        info = self.resolve(ref, tenant=tenant)

        def warm() -> None:
            self._pool.pin(info.sha256, partial(self._load, info.sha256))
            self._release(info.sha256)

        return self._background.submit(warm)

    def drain(self) -> None:
        """Wait for background work submitted so far: prefetches, and file deletions that the
        last release of a deleted or replaced version started."""
        self._background.submit(lambda: None).result()

    def stats(self) -> PoolStats:
        return self._pool.stats()

    def tier(self, info: PrefixInfo) -> str:
        """Where a prefix's KV is now: "device", "host" or "disk"."""
        return self._pool.tier(info.sha256)

    # Internals ----------------------------------------------------------------------------

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
            self._collect(sha256)

    def _collect(self, sha256: str) -> None:
        """Delete a file and its resident KV if no live version refers to it and nothing pins it.

        Runs under the database's write lock, so an upload of the same bytes cannot publish
        between our check and the unlink; the pool drops the entry and the file under its own
        lock, so a pin cannot slip in between either.
        """
        with self._collect_lock, write_transaction(self._engine) as connection:
            referenced = connection.execute(
                select(exists().where(_live, prefixes.c.sha256 == sha256))
            ).scalar()
            gone = referenced or self._pool.discard(sha256, partial(self._store.remove, sha256))
            if gone:
                self._awaiting_release.discard(sha256)
            else:  # pinned: the last release collects it
                self._awaiting_release.add(sha256)

    def _sweep_orphans(self) -> None:
        """Remove what a crash left: temp files, and files no live version refers to."""
        removed_temp = self._store.sweep_temp()
        with write_transaction(self._engine) as connection:
            live = connection.execute(select(prefixes.c.sha256).where(_live).distinct())
            removed = self._store.sweep_blobs(keep={row.sha256 for row in live})
        if removed_temp or removed:
            log.info(
                "registry: swept %d temp workspaces and %d unreferenced files",
                len(removed_temp),
                len(removed),
            )

    def _report_incompatible(self) -> None:
        incompatible = self.incompatible_prefixes()
        if incompatible:
            shown = ", ".join(f"{info.id} v{info.version}" for info in incompatible[:10])
            more = f" and {len(incompatible) - 10} more" if len(incompatible) > 10 else ""
            log.warning(
                "registry: %d prefixes were compiled for another base model and will not be "
                "served (loaded model %s): %s%s",
                len(incompatible),
                self.fingerprint,
                shown,
                more,
            )

    def _live_row(self, connection: Connection, owner: str, name: str) -> Row[Any] | None:
        query = select(prefixes).where(prefixes.c.owner == owner, prefixes.c.name == name, _live)
        return connection.execute(query).one_or_none()

    def _is_live(self, info: PrefixInfo) -> bool:
        with read_transaction(self._engine) as connection:
            row = self._live_row(connection, info.owner, info.name)
        return row is not None and row.version == info.version

    @staticmethod
    def _check_replace(tenant: str, name: str, previous: Row[Any] | None, overwrite: bool) -> None:
        if previous is not None and not overwrite:
            raise AlreadyExists(
                f"prefix {tenant}/{name} exists (version {previous.version}); "
                "upload with overwrite to make a new version",
                field="name",
            )

    @staticmethod
    def _check_quotas(
        connection: Connection, owner: Tenant, previous: Row[Any] | None, new_bytes: int
    ) -> None:
        """An overwrite replaces the previous version's count and bytes instead of adding."""
        used = tenant_rows.usage(connection, owner.name)
        count = used.prefixes + (0 if previous is not None else 1)
        total = used.bytes - (previous.bytes if previous is not None else 0) + new_bytes
        quotas = owner.quotas
        if quotas.max_prefixes is not None and count > quotas.max_prefixes:
            raise QuotaExceeded(owner.name, "max_prefixes", quotas.max_prefixes, count)
        if quotas.max_bytes is not None and total > quotas.max_bytes:
            raise QuotaExceeded(owner.name, "max_bytes", quotas.max_bytes, total)

    def _insert_version(
        self,
        connection: Connection,
        owner: str,
        name: str,
        previous: Row[Any] | None,
        compiled: CompiledPrefix,
        sha256: str,
        size: int,
        visibility: Visibility,
        description: str,
    ) -> PrefixInfo:
        """Retire the previous version and add the next one. Numbers count retired rows too, so
        (owner/name, version) never names two different prefixes."""
        now = time.time()
        if previous is not None:
            connection.execute(
                update(prefixes).where(prefixes.c.id == previous.id).values(retired_at=now)
            )
        last = connection.execute(
            select(func.max(prefixes.c.version)).where(
                prefixes.c.owner == owner, prefixes.c.name == name
            )
        ).scalar()
        values = {
            "owner": owner,
            "name": name,
            "version": (last or 0) + 1,
            "kind": compiled.kind.value,
            "num_virtual_tokens": compiled.num_virtual_tokens,
            "bytes": size,
            "sha256": sha256,
            "model_fingerprint": self.fingerprint,
            "visibility": visibility.value,
            "description": description,
            "created_at": now,
        }
        connection.execute(insert(prefixes).values(**values))
        return self._info_from(values)

    def _info(self, row: Row[Any]) -> PrefixInfo:
        return self._info_from(row._mapping)

    def _info_from(self, values: Mapping[Any, Any]) -> PrefixInfo:
        return PrefixInfo(
            owner=values["owner"],
            name=values["name"],
            version=values["version"],
            kind=PrefixKind(values["kind"]),
            num_virtual_tokens=values["num_virtual_tokens"],
            bytes=values["bytes"],
            sha256=values["sha256"],
            visibility=Visibility(values["visibility"]),
            description=values["description"],
            created_at=timestamp(values["created_at"]),
            model_fingerprint=values["model_fingerprint"],
            compatible=values["model_fingerprint"] == self.fingerprint,
        )
