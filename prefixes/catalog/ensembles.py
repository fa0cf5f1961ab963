"""Stored prompt ensembles: one name for several prefixes of a task, decoded as one answer.

An ensemble is metadata only. Its members are prefix references, resolved and authorised as the
caller each time it is used, exactly like a single prefix: a member deleted, replaced or made
private later fails that use with an error naming the member, never silently changes the
ensemble. Ensembles and prefixes share one name space per owner, so `owner/name` (an OpenAI
`model`) is one or the other, never both.

Thread-safe: every method runs in its own transaction.
"""

from __future__ import annotations

import enum
import json
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, Row, delete, func, insert, or_, select
from sqlalchemy.exc import IntegrityError

from prefixes.catalog import tenants as tenant_rows
from prefixes.catalog import versions
from prefixes.catalog.names import check_name, parse_ref
from prefixes.catalog.records import DEFAULT_QUOTAS, Visibility, timestamp
from prefixes.errors import AlreadyExists, InvalidArgument, NotFound, QuotaExceeded
from prefixes.storage.database import read_transaction, write_transaction
from prefixes.storage.schema import ensembles

MIN_MEMBERS = 2
MAX_DESCRIPTION = 1024


class EnsembleMethod(enum.StrEnum):
    VOTE = "vote"  # every member decodes alone; the most frequent answer wins
    MEAN = "mean"  # one decode from the mean of the members' log-softmax


@dataclass(frozen=True, slots=True)
class EnsembleInfo:
    owner: str
    name: str
    method: EnsembleMethod
    members: tuple[str, ...]  # prefix references, "owner/name"
    visibility: Visibility
    description: str
    created_at: datetime

    @property
    def id(self) -> str:
        return f"{self.owner}/{self.name}"


def parse_method(value: str) -> EnsembleMethod:
    try:
        return EnsembleMethod(value)
    except ValueError:
        raise InvalidArgument("ensemble", "vote or mean", repr(value)) from None


def member_refs(refs: list[str], tenant: str, max_members: int) -> tuple[str, ...]:
    """Members as full references (a bare name is the tenant's own): 2 to `max_members`
    distinct prefixes, or InvalidArgument naming the problem."""
    if not MIN_MEMBERS <= len(refs) <= max_members:
        raise InvalidArgument(
            "prefixes", f"{MIN_MEMBERS} to {max_members} prefix references", len(refs)
        )
    full = [f"{owner}/{name}" for owner, name in (parse_ref(ref, tenant) for ref in refs)]
    duplicates = sorted({ref for ref in full if full.count(ref) > 1})
    if duplicates:
        raise InvalidArgument("prefixes", "distinct prefixes", f"{duplicates[0]} twice")
    return tuple(full)


def name_taken(connection: Connection, owner: str, name: str) -> bool:
    """Whether the owner has an ensemble of this name (a prefix may not take it)."""
    query = select(ensembles.c.seq).where(ensembles.c.owner == owner, ensembles.c.name == name)
    return connection.execute(query).first() is not None


class Ensembles:
    def __init__(self, database: Engine, *, max_members: int = 16, max_per_tenant: int = 100):
        self.database = database
        self.max_members = max_members
        self.max_per_tenant = max_per_tenant

    def create(
        self,
        tenant: str,
        name: str,
        members: list[str],
        *,
        method: str = EnsembleMethod.VOTE,
        visibility: str = Visibility.PRIVATE,
        description: str = "",
    ) -> EnsembleInfo:
        """Store an ensemble of prefixes the tenant may use now (its own, or public ones; a
        public ensemble only of public prefixes, so that whoever may see it may run it)."""
        check_name(name, "name")
        chosen_method = parse_method(method)
        chosen_visibility = Visibility.parse(visibility)
        refs = member_refs(members, tenant, self.max_members)
        if len(description) > MAX_DESCRIPTION:
            raise InvalidArgument(
                "description", f"at most {MAX_DESCRIPTION} characters", len(description)
            )
        try:
            with write_transaction(self.database) as connection:
                tenant_rows.get_tenant(connection, tenant, DEFAULT_QUOTAS)
                self._check_name_free(connection, tenant, name)
                for ref in refs:
                    _check_member(connection, tenant, ref, public=chosen_visibility)
                now = time.time()
                values = {
                    "owner": tenant,
                    "name": name,
                    "method": chosen_method.value,
                    "members": json.dumps(list(refs)),
                    "visibility": chosen_visibility.value,
                    "description": description,
                    "created_at": now,
                }
                connection.execute(insert(ensembles).values(**values))
        except IntegrityError:  # another replica created the name between check and insert
            raise AlreadyExists(f"ensemble {tenant}/{name} was created concurrently") from None
        return _info(values)

    def find(self, ref: str, *, tenant: str) -> EnsembleInfo | None:
        """The ensemble `ref` names if the tenant may see it (own, or public), else None."""
        owner, name = parse_ref(ref, tenant)
        with read_transaction(self.database) as connection:
            query = select(ensembles).where(ensembles.c.owner == owner, ensembles.c.name == name)
            row = connection.execute(query).one_or_none()
        if row is None or (owner != tenant and row.visibility != Visibility.PUBLIC):
            return None
        return _info(row._mapping)

    def get(self, ref: str, *, tenant: str) -> EnsembleInfo:
        found = self.find(ref, tenant=tenant)
        if found is None:
            owner, name = parse_ref(ref, tenant)
            raise NotFound(f"ensemble {owner}/{name} not found", field="ensemble")
        return found

    def visible(self, *, tenant: str) -> list[EnsembleInfo]:
        """The tenant's own ensembles and everyone's public ones, in `owner/name` order."""
        query = (
            select(ensembles)
            .where(or_(ensembles.c.owner == tenant, ensembles.c.visibility == Visibility.PUBLIC))
            .order_by(ensembles.c.owner, ensembles.c.name)
        )
        with read_transaction(self.database) as connection:
            return [_info(row._mapping) for row in connection.execute(query)]

    def delete(self, ref: str, *, tenant: str) -> EnsembleInfo:
        """Remove the ensemble (owner only: anyone else gets NotFound). Its members stay."""
        owner, name = parse_ref(ref, tenant)
        missing = NotFound(f"ensemble {owner}/{name} not found", field="ensemble")
        if owner != tenant:
            raise missing
        where = (ensembles.c.owner == owner, ensembles.c.name == name)
        with write_transaction(self.database) as connection:
            row = connection.execute(select(ensembles).where(*where)).one_or_none()
            if row is None:
                raise missing
            connection.execute(delete(ensembles).where(*where))
        return _info(row._mapping)

    def _check_name_free(self, connection: Connection, tenant: str, name: str) -> None:
        if name_taken(connection, tenant, name):
            raise AlreadyExists(f"ensemble {tenant}/{name} exists", field="name")
        if versions.live_row(connection, tenant, name) is not None:
            raise AlreadyExists(
                f"{tenant}/{name} is a prefix: ensembles and prefixes share names", field="name"
            )
        count = connection.execute(
            select(func.count()).select_from(ensembles).where(ensembles.c.owner == tenant)
        ).scalar_one()
        if count + 1 > self.max_per_tenant:
            raise QuotaExceeded(tenant, "max_ensembles", self.max_per_tenant, count + 1)


def _check_member(connection: Connection, tenant: str, ref: str, *, public: Visibility) -> None:
    owner, name = ref.split("/")
    row: Row[Any] | None = versions.live_row(connection, owner, name)
    if row is None or (owner != tenant and row.visibility != Visibility.PUBLIC):
        raise NotFound(f"prefixes: member {ref} not found", field="prefixes")
    if public is Visibility.PUBLIC and row.visibility != Visibility.PUBLIC:
        raise InvalidArgument(
            "prefixes", "public prefixes only, for a public ensemble", f"{ref} (private)"
        )


def _info(values: Any) -> EnsembleInfo:
    return EnsembleInfo(
        owner=values["owner"],
        name=values["name"],
        method=EnsembleMethod(values["method"]),
        members=tuple(json.loads(values["members"])),
        visibility=Visibility(values["visibility"]),
        description=values["description"],
        created_at=timestamp(values["created_at"]),
    )
