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
from prefixes.errors import CorruptBlob, NotFound
from prefixes.formats.adapters import read_upload
from prefixes.formats.compile import PrefixCompiler
from prefixes.formats.kinds import PrefixKind, RawPrefix
from prefixes.formats.peft_export import peft_files
from prefixes.storage.kvfile import decode_compiled, encode_compiled
from prefixes.storage.paramfile import decode_parameters, encode_parameters
from prefixes.storage.pool import DEFAULT_DEVICE_POOL_BYTES, DEFAULT_HOST_POOL_BYTES, PoolStats
from prefixes.storage.serving import BeforePin, PrefixHandle, Serving
from prefixes.storage.store import BlobStore, StagedBlob, StageHook

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
        # The prefix's own parameters are kept beside its compiled KV (export, transfer); the
        # compiled file, staged last, reports the upload's stages for both.
        parameters = self._store.stage(encode_parameters(raw), report=False)
        try:
            staged = self._store.stage(encode_compiled(compiled, self.fingerprint))
        except BaseException:
            self._store.discard(parameters)
            raise
        try:
            info, replaced = self.commit_version(
                request,
                compiled,
                staged,
                parameters=parameters,
                model_fingerprint=self.fingerprint,
                publish=partial(self._publish, parameters, staged),
                on_commit=on_commit,
            )
        except BaseException:
            for blob in (parameters, staged):  # published but not committed: nothing uses them
                self._store.discard(blob)
                self.serving.collect(blob.sha256)
            raise
        if replaced is not None:
            for old in _files_of(replaced) - _files_of(info):
                self.serving.collect(old)
        return info

    def parameters(self, info: PrefixInfo) -> RawPrefix:
        """A version's own parameters, as uploaded or trained. A version stored before they
        were kept gives its compiled KV as prefix tuning's keys and values: serving those is
        serving the prefix, whatever its kind. NotFound if the version was replaced or deleted
        and its files collected meanwhile."""
        try:
            if info.parameters_sha256 is not None:
                return decode_parameters(self._store.read(info.parameters_sha256))
            kv = decode_compiled(self._store.read(info.sha256))
        except CorruptBlob:
            if self.is_current(info):
                raise
            raise NotFound(
                f"prefix {info.id} version {info.version} was replaced or deleted meanwhile",
                field="prefix",
            ) from None
        return RawPrefix(PrefixKind.PREFIX_TUNING, kv.float())

    def export(
        self, ref: str, *, tenant: str, version: int | None = None, base_model: str | None = None
    ) -> tuple[PrefixInfo, dict[str, bytes]]:
        """PEFT's two files for a prefix the tenant may use (its own, or public; NotFound
        otherwise, as `get`). `version`, if given, must be the live one: earlier versions'
        files are not kept. `base_model` names the model in the config where the upload did
        not."""
        info = self.get(ref, tenant=tenant)
        if version is not None and version != info.version:
            raise NotFound(
                f"prefix {info.id} has no version {version} to export: its current version is "
                f"{info.version}, and earlier versions are not kept",
                field="version",
            )
        raw = self.parameters(info)
        files = peft_files(raw, num_layers=self.compiler.spec.num_layers, base_model=base_model)
        return info, files

    def delete(self, ref: str, *, tenant: str) -> PrefixInfo:
        """Hide the prefix at once (owner only: anyone else gets NotFound). Requests holding it
        keep it; its file goes when nothing uses it."""
        retired = super().delete(ref, tenant=tenant)
        for sha256 in _files_of(retired):
            self.serving.collect(sha256)
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

    def _publish(self, *staged: StagedBlob) -> None:
        """Publish an upload's files; the last one reports the stage."""
        for blob in staged[:-1]:
            self._store.publish(blob, report=False)
        self._store.publish(staged[-1])

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


def _files_of(info: PrefixInfo) -> set[str]:
    """The files a version names: its compiled KV and, if kept, its parameters."""
    return {info.sha256} | ({info.parameters_sha256} if info.parameters_sha256 else set())
