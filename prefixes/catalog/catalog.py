"""The registry's catalog: tenants, API keys, quotas and prefix versions, kept in the database.

It opens without a model, so the offline `prefix-server tenant create` uses it alone. Given the
loaded model's fingerprint it also says which versions that model may serve (`compatible`,
`resolve`); without one, none. It holds no tensors and writes no files: an upload hands it a
`publish` step to run under the write lock, and the serving side
(prefixes/storage/serving.py) shares its database to decide when a file may go.

Thread-safe: every method runs in its own transaction.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from sqlalchemy import Connection, Row
from sqlalchemy.exc import IntegrityError

from prefixes.catalog import ensembles as ensemble_rows
from prefixes.catalog import rate_limits as rate_limit_rows
from prefixes.catalog import tenants as tenant_rows
from prefixes.catalog import versions
from prefixes.catalog.names import check_name, parse_ref
from prefixes.catalog.records import (
    DEFAULT_QUOTAS,
    IssuedKey,
    KeyInfo,
    Page,
    PrefixInfo,
    Quotas,
    RateLimits,
    Scope,
    Tenant,
    Usage,
    Visibility,
    timestamp,
)
from prefixes.errors import AlreadyExists, Incompatible, InvalidPrefix, NotFound, QuotaExceeded
from prefixes.formats.kinds import CompiledPrefix, PrefixKind
from prefixes.storage.database import open_engine, read_transaction, sqlite_url, write_transaction
from prefixes.storage.schema import migrate
from prefixes.storage.store import StagedBlob, StageHook, UploadStage

MAX_DESCRIPTION = 1024
MAX_PAGE = 1000
# Runs inside an upload's write transaction, after the new version's row is written: what must
# commit together with the prefix or not at all (a fine-tuning job's success). Raising rolls
# the upload back.
OnCommit = Callable[[Connection, PrefixInfo], None]


@dataclass(frozen=True, slots=True)
class UploadRequest:
    """An upload's metadata, checked before anything is compiled."""

    owner: Tenant
    name: str
    visibility: Visibility | None  # None: private for a new name, the previous version's else
    description: str
    overwrite: bool

    def check_virtual_tokens(self, tokens: int) -> None:
        """The tenant's `max_virtual_tokens`, known once the files are read."""
        limit = self.owner.quotas.max_virtual_tokens
        if limit is not None and tokens > limit:
            raise QuotaExceeded(self.owner.name, "max_virtual_tokens", limit, tokens)


class Catalog:
    def __init__(
        self,
        data_dir: Path | str,
        *,
        database_url: str | None = None,
        fingerprint: str | None = None,
        default_quotas: Quotas = DEFAULT_QUOTAS,
        on_stage: StageHook | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.fingerprint = fingerprint  # the loaded model's; None when no model is loaded
        self.default_quotas = default_quotas
        self._on_stage = on_stage or (lambda stage: None)
        self.database = open_engine(database_url or sqlite_url(self.data_dir))
        migrate(self.database)

    def close(self) -> None:
        self.database.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # Tenants and keys ---------------------------------------------------------------------

    def create_tenant(self, name: str, quotas: Quotas | None = None) -> IssuedKey:
        """Create a tenant with its first API key (shown once: only its hash is kept)."""
        with write_transaction(self.database) as connection:
            tenant_rows.create_tenant(connection, name, quotas or Quotas())
            return tenant_rows.issue_key(connection, name)

    def get_tenant(self, name: str) -> Tenant:
        with read_transaction(self.database) as connection:
            return tenant_rows.get_tenant(connection, name, self.default_quotas)

    def set_quotas(self, name: str, quotas: Quotas) -> Tenant:
        """Replace a tenant's own quotas (None fields follow the registry's defaults)."""
        with write_transaction(self.database) as connection:
            tenant_rows.set_quotas(connection, name, quotas)
            return tenant_rows.get_tenant(connection, name, self.default_quotas)

    def update_quotas(self, name: str, **changes: int | None) -> Tenant:
        """Change the named quotas and keep the others (None: back to the registry's default).
        Read and written in one transaction, so concurrent updates of different quotas both
        stay. InvalidPrefix for a value that is not null or an integer in its range."""
        unknown = set(changes) - {field.name for field in dataclasses.fields(Quotas)}
        if unknown:
            raise TypeError(f"unknown quotas: {sorted(unknown)}")
        with write_transaction(self.database) as connection:
            own = tenant_rows.own_quotas(connection, name)
            tenant_rows.set_quotas(connection, name, dataclasses.replace(own, **changes))
            return tenant_rows.get_tenant(connection, name, self.default_quotas)

    def rate_limits(self, name: str) -> RateLimits:
        """The tenant's own rate limits (None: the server's default)."""
        with read_transaction(self.database) as connection:
            return rate_limit_rows.own_rate_limits(connection, name)

    def update_rate_limits(self, name: str, **changes: int | None) -> RateLimits:
        """Change the named rate limits and keep the other, in one transaction."""
        unknown = set(changes) - {field.name for field in dataclasses.fields(RateLimits)}
        if unknown:
            raise TypeError(f"unknown rate limits: {sorted(unknown)}")
        with write_transaction(self.database) as connection:
            own = rate_limit_rows.own_rate_limits(connection, name)
            changed = dataclasses.replace(own, **changes)
            rate_limit_rows.set_rate_limits(connection, name, changed)
            return changed

    def rate_limit_overrides(self) -> dict[str, RateLimits]:
        with read_transaction(self.database) as connection:
            return rate_limit_rows.all_overrides(connection)

    def usage(self, name: str) -> Usage:
        with read_transaction(self.database) as connection:
            tenant_rows.get_tenant(connection, name, self.default_quotas)
            return tenant_rows.usage(connection, name)

    def issue_key(self, tenant: str, *, max_active: int | None = None) -> IssuedKey:
        """A new key for the tenant (shown once). With `max_active`, KeyLimit rather than give
        the tenant more active keys than that."""
        with write_transaction(self.database) as connection:
            tenant_rows.get_tenant(connection, tenant, self.default_quotas)
            return tenant_rows.issue_key(connection, tenant, max_active)

    def revoke_key(self, tenant: str, key_id: str, *, keep_one: bool = False) -> None:
        """Revoke an active key at once. With `keep_one`, KeyLimit rather than leave the
        tenant without an active key. NotFound for an unknown tenant or no such active key."""
        with write_transaction(self.database) as connection:
            tenant_rows.get_tenant(connection, tenant, self.default_quotas)
            tenant_rows.revoke_key(connection, tenant, key_id, keep_one=keep_one)

    def list_keys(self, tenant: str) -> list[KeyInfo]:
        """Every key the tenant was issued, oldest first, revoked ones included."""
        with read_transaction(self.database) as connection:
            tenant_rows.get_tenant(connection, tenant, self.default_quotas)
            return tenant_rows.list_keys(connection, tenant)

    def authenticate(self, api_key: str) -> str:
        """The name of the tenant owning this key; Unauthorized if unknown or revoked."""
        return self.identify(api_key).tenant

    def identify(self, api_key: str) -> KeyInfo:
        """The active key presented (its id and tenant); Unauthorized if unknown or revoked."""
        with read_transaction(self.database) as connection:
            return tenant_rows.authenticate(connection, api_key)

    # Prefix versions ----------------------------------------------------------------------

    def get(self, ref: str, *, tenant: str) -> PrefixInfo:
        """Metadata of a prefix the tenant may see (its own, or public); NotFound otherwise."""
        owner, name = parse_ref(ref, tenant)
        with read_transaction(self.database) as connection:
            row = versions.live_row(connection, owner, name)
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

    def is_current(self, info: PrefixInfo) -> bool:
        """Whether `info` is still the live version of its name (not deleted nor replaced)."""
        with read_transaction(self.database) as connection:
            row = versions.live_row(connection, info.owner, info.name)
        return row is not None and row.version == info.version

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
        after = parse_ref(cursor, tenant) if cursor else None
        with read_transaction(self.database) as connection:
            rows = versions.visible_page(connection, tenant, scope, limit, after)
        items = [self._info(row) for row in rows[:limit]]
        return Page(items, items[-1].id if len(rows) > limit else None)

    def delete(self, ref: str, *, tenant: str) -> PrefixInfo:
        """Hide the prefix at once (owner only: anyone else gets NotFound) and return the
        retired version. Its file stays until the serving side collects it."""
        owner, name = parse_ref(ref, tenant)
        if owner != tenant:
            raise NotFound(f"prefix {owner}/{name} not found", field="prefix")
        with write_transaction(self.database) as connection:
            row = versions.live_row(connection, owner, name)
            if row is None:
                raise NotFound(f"prefix {owner}/{name} not found", field="prefix")
            versions.retire(connection, row.id, time.time())
        return self._info(row)

    def update(
        self,
        ref: str,
        *,
        tenant: str,
        visibility: Visibility | str | None = None,
        description: str | None = None,
    ) -> PrefixInfo:
        """Change who may use the prefix and its description, in place: the same version, the
        same files (owner only: anyone else gets NotFound). A prefix made private is refused
        to other tenants from their next request on."""
        owner, name = parse_ref(ref, tenant)
        changes: dict[str, str] = {}
        if visibility is not None:
            changes["visibility"] = Visibility.parse(visibility).value
        if description is not None:
            if len(description) > MAX_DESCRIPTION:
                raise InvalidPrefix(
                    "description", f"at most {MAX_DESCRIPTION} characters", len(description)
                )
            changes["description"] = description
        if owner != tenant:
            raise NotFound(f"prefix {owner}/{name} not found", field="prefix")
        with write_transaction(self.database) as connection:
            row = versions.live_row(connection, owner, name)
            if row is None:
                raise NotFound(f"prefix {owner}/{name} not found", field="prefix")
            if changes:
                versions.describe(connection, row.id, changes)
                row = versions.live_row(connection, owner, name)
        assert row is not None
        return self._info(row)

    def incompatible_prefixes(self) -> list[PrefixInfo]:
        """Live prefixes compiled against another base model: listed, never served."""
        with read_transaction(self.database) as connection:
            rows = versions.compiled_elsewhere(connection, self.fingerprint)
        return [self._info(row) for row in rows]

    # The upload transaction's metadata side -----------------------------------------------

    def check_upload(
        self,
        tenant: str,
        name: str,
        *,
        visibility: Visibility | str | None,
        description: str,
        overwrite: bool,
    ) -> UploadRequest:
        """The refusals that need no model, made before anything is compiled: the name, the
        visibility, the description, the tenant, a name taken without `overwrite`, and the
        count and byte quotas if already at their limit."""
        check_name(name, "name")
        chosen = None if visibility is None else Visibility.parse(visibility)
        if len(description) > MAX_DESCRIPTION:
            raise InvalidPrefix(
                "description", f"at most {MAX_DESCRIPTION} characters", len(description)
            )
        with read_transaction(self.database) as connection:
            owner = tenant_rows.get_tenant(connection, tenant, self.default_quotas)
            previous = versions.live_row(connection, tenant, name)
            _check_name(connection, tenant, name, previous, overwrite)
            _check_quotas(connection, owner, previous, new_bytes=0)
        return UploadRequest(owner, name, chosen, description, overwrite)

    def commit_version(
        self,
        request: UploadRequest,
        compiled: CompiledPrefix,
        staged: StagedBlob,
        *,
        parameters: StagedBlob,
        model_fingerprint: str,
        publish: Callable[[], None],
        on_commit: OnCommit | None = None,
    ) -> tuple[PrefixInfo, PrefixInfo | None]:
        """In one write transaction: check the name and every quota again (the version's
        bytes are both files': the compiled KV, `staged`, and its own `parameters`), `publish`
        the staged files, retire the previous version, insert the new one, run `on_commit`,
        commit.
        Returns the new version and the one it replaced, if any (whose file the caller
        collects)."""
        tenant, name = request.owner.name, request.name
        try:
            with write_transaction(self.database) as connection:
                owner = tenant_rows.get_tenant(connection, tenant, self.default_quotas)
                previous = versions.live_row(connection, tenant, name)
                _check_name(connection, tenant, name, previous, request.overwrite)
                stored = staged.size + parameters.size
                _check_quotas(connection, owner, previous, new_bytes=stored)
                # Published under the write lock: a concurrent collection of the same bytes
                # either ran before (and we put the file back) or waits for our commit.
                publish()
                visibility = request.visibility or (
                    Visibility.parse(previous.visibility) if previous else Visibility.PRIVATE
                )
                row = versions.add_version(
                    connection,
                    previous,
                    {
                        "owner": owner.name,
                        "name": name,
                        "kind": compiled.kind.value,
                        "num_virtual_tokens": compiled.num_virtual_tokens,
                        "bytes": stored,
                        "sha256": staged.sha256,
                        "parameters_sha256": parameters.sha256,
                        "model_fingerprint": model_fingerprint,
                        "visibility": visibility.value,
                        "description": request.description,
                    },
                )
                if on_commit is not None:
                    on_commit(connection, self._info_from(row))
                self._on_stage(UploadStage.ROW_WRITTEN)
        except IntegrityError:  # another replica took the name between our check and insert
            raise AlreadyExists(f"prefix {tenant}/{name} was created concurrently") from None
        self._on_stage(UploadStage.COMMITTED)
        return self._info_from(row), None if previous is None else self._info(previous)

    # Internals ----------------------------------------------------------------------------

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
            parameters_sha256=values.get("parameters_sha256"),
        )


def _check_name(
    connection: Connection, tenant: str, name: str, previous: Row[Any] | None, overwrite: bool
) -> None:
    if previous is None and ensemble_rows.name_taken(connection, tenant, name):
        raise AlreadyExists(
            f"{tenant}/{name} is an ensemble: ensembles and prefixes share names", field="name"
        )
    if previous is not None and not overwrite:
        raise AlreadyExists(
            f"prefix {tenant}/{name} exists (version {previous.version}); "
            "upload with overwrite to make a new version",
            field="name",
        )


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
