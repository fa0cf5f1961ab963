"""The prefix registry: the catalog and the serving side on one database and one store, and the
upload, the one operation that needs them both and the model.

Layers, each in its own module: `catalog` (tenants, keys, quotas, versions; opens without a
model) over `tenants` and `versions` (the SQL) and `schema`; `serving` (pinned handles, the
`pool`, collection of files); `store` (content-addressed files) and `kvfile` (their format);
`compile` (the `PrefixCompiler`, the model-facing step). docs/registry.md gives the whole picture.

Thread-safe: the HTTP layer and the engine thread may call any method concurrently.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import partial
from pathlib import Path

from prefixes.catalog.catalog import Catalog, OnCommit
from prefixes.catalog.records import DEFAULT_QUOTAS, PrefixInfo, Quotas, Visibility
from prefixes.formats.adapters import read_upload
from prefixes.formats.compile import PrefixCompiler
from prefixes.storage.kvfile import encode_compiled
from prefixes.storage.pool import DEFAULT_DEVICE_POOL_BYTES, DEFAULT_HOST_POOL_BYTES, PoolStats
from prefixes.storage.serving import BeforePin, PrefixHandle, Serving
from prefixes.storage.store import BlobStore, StageHook

log = logging.getLogger(__name__)


class Registry(Catalog):
    """A catalog bound to a model: it also compiles uploads with `compiler` and serves them.

    Everything about tenants, keys, quotas and metadata is the catalog's; `serving` holds the
    pool; the store is shared by the upload (which writes files) and `serving` (which reads and
    collects them).
    """

    fingerprint: str  # the compiler's model: always known here

    def __init__(
        self,
        data_dir: Path | str,
        *,
        compiler: PrefixCompiler,
        database_url: str | None = None,
        device_pool_bytes: int = DEFAULT_DEVICE_POOL_BYTES,
        host_pool_bytes: int = DEFAULT_HOST_POOL_BYTES,
        default_quotas: Quotas = DEFAULT_QUOTAS,
        on_stage: StageHook | None = None,
        store_dir: Path | str | None = None,
        file_grace: float = 0.0,
    ) -> None:
        """`store_dir` holds the prefix files (default: `data_dir`); replicas share it, with
        a `file_grace` period before a deleted prefix's file goes (see `Serving`)."""
        super().__init__(
            data_dir,
            database_url=database_url,
            fingerprint=compiler.spec.fingerprint(),
            default_quotas=default_quotas,
            on_stage=on_stage,
        )
        self.compiler = compiler
        self._store = BlobStore(Path(store_dir) if store_dir else self.data_dir, on_stage)
        self.serving = Serving(
            self,
            self._store,
            dtype=compiler.dtype,
            device=compiler.device,  # where the model runs, so where its prefixes are served
            device_pool_bytes=device_pool_bytes,
            host_pool_bytes=host_pool_bytes,
            file_grace=file_grace,
        )
        self._report_incompatible()

    def close(self) -> None:
        self.serving.close()
        self._store.close()
        super().close()

    def upload(
        self,
        tenant: str,
        name: str,
        files: Mapping[str, bytes],
        *,
        visibility: Visibility | str | None = None,
        description: str = "",
        overwrite: bool = False,
        on_commit: OnCommit | None = None,
    ) -> PrefixInfo:
        """Read, validate, compile, store and commit: servable when this returns.

        With `overwrite`, an existing name gets a new version; requests holding the old one keep
        it. A crash at any point leaves either the whole new version or nothing visible.
        Without `visibility`, a new prefix is private and a new version keeps the previous one's.
        `on_commit` runs in the commit's transaction (see `Catalog.commit_version`).
        """
        request = self.check_upload(
            tenant, name, visibility=visibility, description=description, overwrite=overwrite
        )
        raw = read_upload(files)
        request.check_virtual_tokens(raw.num_virtual_tokens)
        compiled = self.compiler.compile(raw)
        self.serving.check_fits(compiled.nbytes)
        staged = self._store.stage(encode_compiled(compiled, self.fingerprint))
        try:
            info, replaced = self.commit_version(
                request,
                compiled,
                staged,
                model_fingerprint=self.fingerprint,
                publish=partial(self._store.publish, staged),
                on_commit=on_commit,
            )
        except BaseException:
            self._store.discard(staged)
            self.serving.collect(staged.sha256)  # published but not committed: nothing uses it
            raise
        if replaced is not None and replaced.sha256 != info.sha256:
            self.serving.collect(replaced.sha256)
        return info

    def delete(self, ref: str, *, tenant: str) -> PrefixInfo:
        """Hide the prefix at once (owner only: anyone else gets NotFound). Requests holding it
        keep it; its file goes when nothing uses it."""
        retired = super().delete(ref, tenant=tenant)
        self.serving.collect(retired.sha256)
        return retired

    def acquire(
        self, ref: str, *, tenant: str, before_pin: BeforePin | None = None
    ) -> PrefixHandle:
        """Pin the current version's KV on the device (see `Serving.acquire`)."""
        return self.serving.acquire(ref, tenant=tenant, before_pin=before_pin)

    def drain(self) -> None:
        self.serving.drain()

    def stats(self) -> PoolStats:
        return self.serving.stats()

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
