"""API keys -> tenants (through the registry's hashed keys); the admin key."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from prefixes.errors import Unauthorized
from prefixes.usage.records import Counts
from server.api.errors import ApiError
from server.api.rate_limit_headers import rate_limited, show_rate_limits
from server.api.rate_limits import RateLimited
from server.api.services import Ready, ready

_CHALLENGE = {"WWW-Authenticate": "Bearer"}


# Declares the scheme in the OpenAPI document; the checks below give this API's own 401s.
_BEARER = HTTPBearer(auto_error=False, description="an API key: Authorization: Bearer <key>")


def bearer_key(
    request: Request, _documented: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]
) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise ApiError(
            401, "unauthorized", "missing API key: send 'Authorization: Bearer <key>'",
            headers=_CHALLENGE,
        )  # fmt: skip
    return key.strip()


async def current_tenant(
    request: Request,
    key: Annotated[str, Depends(bearer_key)],
    server: Annotated[Ready, Depends(ready)],
) -> str:
    try:
        tenant = await run_in_threadpool(server.registry.authenticate, key)
    except Unauthorized:
        raise ApiError(401, "unauthorized", "invalid API key", headers=_CHALLENGE) from None
    admit_request(server, request, tenant)
    return tenant


def admit_request(server: Ready, request: Request, tenant: str) -> None:
    """Count the request against the tenant's requests per minute, in memory (429 beyond),
    and show the figures in the response's headers."""
    try:
        snapshot = server.rate_limiter.admit_request(tenant)
    except RateLimited as exc:
        server.usage_meter.add(tenant, "", Counts(failed_rate_limited=1))
        raise rate_limited(request, exc) from None
    show_rate_limits(request, snapshot)


def require_admin(
    key: Annotated[str, Depends(bearer_key)], server: Annotated[Ready, Depends(ready)]
) -> None:
    admin = server.settings.admin_key
    if admin is None:
        raise ApiError(403, "forbidden", "no admin key is configured on this server")
    if not hmac.compare_digest(key.encode(), admin.get_secret_value().encode()):
        raise ApiError(401, "unauthorized", "invalid admin key", headers=_CHALLENGE)


@dataclass(frozen=True, slots=True)
class Caller:
    """Who calls a route under /v1/tenants/{name} that a tenant may also use on itself."""

    tenant: str | None  # None: the admin
    key_id: str | None = None  # the tenant's key that authenticated the request

    def require_access(self, name: str) -> None:
        """403 unless the admin or tenant `name` itself calls (whether `name` exists or not,
        so another tenant learns nothing about it)."""
        if self.tenant is not None and self.tenant != name:
            raise ApiError(
                403, "forbidden",
                f"this is tenant {self.tenant!r}'s key: a tenant key reaches its own tenant only",
            )  # fmt: skip


async def admin_or_tenant(
    request: Request,
    key: Annotated[str, Depends(bearer_key)],
    server: Annotated[Ready, Depends(ready)],
) -> Caller:
    admin = server.settings.admin_key
    if admin is not None and hmac.compare_digest(key.encode(), admin.get_secret_value().encode()):
        return Caller(None)
    try:
        found = await run_in_threadpool(server.registry.identify, key)
    except Unauthorized:
        raise ApiError(401, "unauthorized", "invalid API key", headers=_CHALLENGE) from None
    admit_request(server, request, found.tenant)
    return Caller(found.tenant, found.key_id)


Tenant = Annotated[str, Depends(current_tenant)]
AdminOrTenant = Annotated[Caller, Depends(admin_or_tenant)]
Server = Annotated[Ready, Depends(ready)]
