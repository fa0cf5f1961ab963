"""POST /v1/tenants: the admin creates a tenant and receives its first API key, once."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool

from server.api.auth import Server, require_admin
from server.api.schemas import TenantCreate, TenantCreated

router = APIRouter()


@router.post("/v1/tenants", status_code=201, response_model=TenantCreated)
async def create_tenant(
    body: TenantCreate, server: Server, _: Annotated[None, Depends(require_admin)]
) -> TenantCreated:
    issued = await run_in_threadpool(server.registry.create_tenant, body.name)
    return TenantCreated(tenant=issued.tenant, api_key=issued.api_key)
