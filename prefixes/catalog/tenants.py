"""Tenants and their API keys. Keys are random and stored only as a sha256 hash.

A salted slow hash (bcrypt, argon2) protects guessable passwords; these keys carry 256 random
bits, so a plain sha256 cannot be inverted, and an indexed lookup by hash stays fast per request.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

from sqlalchemy import Connection, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from prefixes.catalog.names import check_name
from prefixes.catalog.records import IssuedKey, KeyInfo, Quotas, Tenant, Usage, timestamp
from prefixes.errors import AlreadyExists, KeyLimit, NotFound, Unauthorized
from prefixes.storage.schema import api_keys, prefixes, tenants

KEY_PREFIX = "psk_"  # recognisable in logs and by secret scanners


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def create_tenant(connection: Connection, name: str, quotas: Quotas) -> None:
    """Inside a write transaction, so the check and the insert cannot interleave with another."""
    check_name(name, "tenant")
    if connection.execute(select(tenants.c.name).where(tenants.c.name == name)).first():
        raise AlreadyExists(f"tenant {name!r} already exists", field="name")
    try:
        connection.execute(
            insert(tenants).values(
                name=name,
                max_prefixes=quotas.max_prefixes,
                max_bytes=quotas.max_bytes,
                max_virtual_tokens=quotas.max_virtual_tokens,
                created_at=time.time(),
            )
        )
    except IntegrityError:  # the primary key's verdict, should a writer ever run unlocked
        raise AlreadyExists(f"tenant {name!r} already exists", field="name") from None


def get_tenant(connection: Connection, name: str, defaults: Quotas) -> Tenant:
    row = connection.execute(select(tenants).where(tenants.c.name == name)).one_or_none()
    if row is None:
        raise NotFound(f"tenant {name!r} does not exist", field="tenant")
    own = Quotas(row.max_prefixes, row.max_bytes, row.max_virtual_tokens)
    return Tenant(row.name, own.over(defaults), timestamp(row.created_at))


def own_quotas(connection: Connection, name: str) -> Quotas:
    """The tenant's own values, as stored: None where it follows the registry's default."""
    row = connection.execute(select(tenants).where(tenants.c.name == name)).one_or_none()
    if row is None:
        raise NotFound(f"tenant {name!r} does not exist", field="tenant")
    return Quotas(row.max_prefixes, row.max_bytes, row.max_virtual_tokens)


def set_quotas(connection: Connection, name: str, quotas: Quotas) -> None:
    result = connection.execute(
        update(tenants)
        .where(tenants.c.name == name)
        .values(
            max_prefixes=quotas.max_prefixes,
            max_bytes=quotas.max_bytes,
            max_virtual_tokens=quotas.max_virtual_tokens,
        )
    )
    if result.rowcount == 0:
        raise NotFound(f"tenant {name!r} does not exist", field="tenant")


def usage(connection: Connection, name: str) -> Usage:
    """What a tenant's live prefixes hold: their number and the bytes of their files."""
    count, total = connection.execute(
        select(func.count(), func.coalesce(func.sum(prefixes.c.bytes), 0)).where(
            prefixes.c.owner == name, prefixes.c.retired_at.is_(None)
        )
    ).one()
    return Usage(int(count), int(total))


def issue_key(connection: Connection, tenant: str, max_active: int | None = None) -> IssuedKey:
    """Inside a write transaction, so the `max_active` check and the insert are one step."""
    if max_active is not None:
        active = connection.execute(
            select(func.count()).where(api_keys.c.tenant == tenant, api_keys.c.revoked_at.is_(None))
        ).scalar_one()
        if active >= max_active:
            raise KeyLimit(
                f"tenant {tenant!r} has {active} active keys, the most it may issue itself is "
                f"{max_active}: revoke one first",
                field="key_id",
            )
    api_key = KEY_PREFIX + secrets.token_urlsafe(32)
    key_id = secrets.token_hex(6)
    connection.execute(
        insert(api_keys).values(
            key_id=key_id, tenant=tenant, key_hash=hash_key(api_key), created_at=time.time()
        )
    )
    return IssuedKey(tenant, key_id, api_key)


def revoke_key(connection: Connection, tenant: str, key_id: str, *, keep_one: bool) -> None:
    """Inside a write transaction, so with `keep_one` two revocations cannot both pass the
    check and leave the tenant without a key."""
    active = api_keys.c.tenant == tenant, api_keys.c.revoked_at.is_(None)
    if keep_one:
        ids = set(connection.execute(select(api_keys.c.key_id).where(*active)).scalars())
        if ids == {key_id}:
            raise KeyLimit(
                f"key {key_id!r} is the last active key of tenant {tenant!r}: "
                "issue a new key before revoking it",
                field="key_id",
            )
    result = connection.execute(
        update(api_keys).where(api_keys.c.key_id == key_id, *active).values(revoked_at=time.time())
    )
    if result.rowcount == 0:
        raise NotFound(f"tenant {tenant!r} has no active key {key_id!r}", field="key_id")


def list_keys(connection: Connection, tenant: str) -> list[KeyInfo]:
    rows = connection.execute(
        select(api_keys).where(api_keys.c.tenant == tenant).order_by(api_keys.c.created_at)
    )
    return [
        KeyInfo(row.key_id, row.tenant, timestamp(row.created_at), row.revoked_at is not None)
        for row in rows
    ]


def authenticate(connection: Connection, api_key: str) -> KeyInfo:
    """The active key presented, with its tenant; Unauthorized for anything else."""
    presented = hash_key(api_key)
    row = connection.execute(
        select(api_keys).where(api_keys.c.key_hash == presented, api_keys.c.revoked_at.is_(None))
    ).one_or_none()
    # The lookup is by hash, so timing reveals nothing about the key; compare_digest keeps the
    # final equality constant-time all the same.
    if row is None or not hmac.compare_digest(row.key_hash, presented):
        raise Unauthorized("unknown or revoked API key", field="authorization")
    return KeyInfo(row.key_id, row.tenant, timestamp(row.created_at), revoked=False)
