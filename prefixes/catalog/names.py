"""Tenant and prefix names, and references `owner/name` (own prefixes also as plain `name`)."""

from __future__ import annotations

import re

from prefixes.errors import InvalidName

NAME_RULE = "^[a-z0-9][a-z0-9._-]{0,63}$"
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


def check_name(name: str, what: str = "name") -> str:
    """Return the name if it is valid; raise InvalidName naming the rule otherwise."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidName(f"{what}: expected {NAME_RULE}, found {name!r}", field=what)
    return name


def parse_ref(ref: str, tenant: str) -> tuple[str, str]:
    """`owner/name` -> (owner, name); a bare `name` is the caller's own prefix."""
    if not isinstance(ref, str):
        raise InvalidName(f"prefix: expected 'owner/name' or 'name', found {ref!r}", field="prefix")
    owner, slash, name = ref.rpartition("/")
    if not slash:
        owner = tenant
    elif "/" in owner:
        raise InvalidName(f"prefix: expected 'owner/name' or 'name', found {ref!r}", field="prefix")
    return check_name(owner, "owner"), check_name(name, "prefix name")
