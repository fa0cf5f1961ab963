"""Tenants: the admin creates them (the first API key shown once), reads and sets their quotas;
the admin or the tenant itself lists, issues and revokes its keys (docs/api.md)."""

from __future__ import annotations

import dataclasses
from typing import Annotated

from fastapi import APIRouter, Depends, Response
from fastapi.concurrency import run_in_threadpool

from prefixes.catalog.records import RateLimits
from prefixes.registry import Registry
from server.api.auth import AdminOrTenant, Server, require_admin
from server.api.query import reject_unknown_query
from server.api.rate_limits import first_set
from server.api.schemas import (
    ERROR_RESPONSES,
    KeyIssued,
    KeyList,
    KeyObject,
    QuotaUpdate,
    TenantCreate,
    TenantCreated,
    TenantInfo,
    TenantQuotas,
    TenantRateLimits,
    TenantUsage,
)

router = APIRouter(responses=ERROR_RESPONSES, dependencies=[Depends(reject_unknown_query)])


@router.post("/v1/tenants", status_code=201, response_model=TenantCreated)
async def create_tenant(
    body: TenantCreate, server: Server, _: Annotated[None, Depends(require_admin)]
) -> TenantCreated:
    issued = await run_in_threadpool(server.registry.create_tenant, body.name)
    return TenantCreated(tenant=issued.tenant, api_key=issued.api_key)


# The most active keys a tenant may hold by issuing them itself (the admin is not limited).
TENANT_MAX_ACTIVE_KEYS = 10


def tenant_info(registry: Registry, defaults: RateLimits, name: str) -> TenantInfo:
    tenant = registry.get_tenant(name)
    used = registry.usage(name)
    quotas = tenant.quotas
    own = registry.rate_limits(name)
    return TenantInfo(
        tenant=tenant.name,
        created_at=tenant.created_at.isoformat(),
        quotas=TenantQuotas(
            max_prefixes=quotas.max_prefixes,
            max_bytes=quotas.max_bytes,
            max_virtual_tokens=quotas.max_virtual_tokens,
        ),
        rate_limits=TenantRateLimits(
            requests_per_minute=first_set(own.requests_per_minute, defaults.requests_per_minute),
            tokens_per_minute=first_set(own.tokens_per_minute, defaults.tokens_per_minute),
        ),
        usage=TenantUsage(prefixes=used.prefixes, bytes=used.bytes),
    )


@router.get("/v1/tenants/{name}", response_model=TenantInfo)
async def get_tenant(name: str, server: Server, caller: AdminOrTenant) -> TenantInfo:
    caller.require_access(name)
    defaults = server.rate_limiter.defaults
    return await run_in_threadpool(tenant_info, server.registry, defaults, name)


RATE_LIMIT_FIELDS = {field.name for field in dataclasses.fields(RateLimits)}


@router.patch("/v1/tenants/{name}", response_model=TenantInfo)
async def update_tenant(
    name: str,
    body: QuotaUpdate,
    server: Server,
    _: Annotated[None, Depends(require_admin)],
) -> TenantInfo:
    """Quotas and rate limits; the new rate limits hold on this replica from the tenant's
    next request (on the others within --rate-limit-refresh seconds)."""
    changes = body.model_dump(exclude_unset=True)
    limits = {k: v for k, v in changes.items() if k in RATE_LIMIT_FIELDS}
    quotas = {k: v for k, v in changes.items() if k not in RATE_LIMIT_FIELDS}
    await run_in_threadpool(server.registry.update_quotas, name, **quotas)
    if limits:
        own = await run_in_threadpool(server.registry.update_rate_limits, name, **limits)
        server.rate_limiter.override(name, own)
    defaults = server.rate_limiter.defaults
    return await run_in_threadpool(tenant_info, server.registry, defaults, name)


@router.get("/v1/tenants/{name}/keys", response_model=KeyList)
async def list_keys(name: str, server: Server, caller: AdminOrTenant) -> KeyList:
    caller.require_access(name)
    keys = await run_in_threadpool(server.registry.list_keys, name)
    return KeyList(
        data=[
            KeyObject(
                key_id=key.key_id,
                created_at=key.created_at.isoformat(),
                revoked=key.revoked,
                current=key.key_id == caller.key_id,
            )
            for key in keys
        ]
    )


@router.post("/v1/tenants/{name}/keys", status_code=201, response_model=KeyIssued)
async def issue_key(name: str, server: Server, caller: AdminOrTenant) -> KeyIssued:
    caller.require_access(name)
    limit = None if caller.tenant is None else TENANT_MAX_ACTIVE_KEYS
    issued = await run_in_threadpool(server.registry.issue_key, name, max_active=limit)
    return KeyIssued(tenant=issued.tenant, key_id=issued.key_id, api_key=issued.api_key)


@router.delete("/v1/tenants/{name}/keys/{key_id}", status_code=204)
async def revoke_key(name: str, key_id: str, server: Server, caller: AdminOrTenant) -> Response:
    caller.require_access(name)
    # A tenant keeps one active key; the admin may revoke the last (to lock a tenant out).
    keep_one = caller.tenant is not None
    await run_in_threadpool(server.registry.revoke_key, name, key_id, keep_one=keep_one)
    return Response(status_code=204)
