"""/v1/ensembles: stored prompt ensembles, usable by name wherever a prefix is (`prefix` on
/v1/generate, `model` on the OpenAI routes). Another tenant's private ensemble is 404."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from fastapi.concurrency import run_in_threadpool

from prefixes.catalog.ensembles import EnsembleInfo
from server.api.auth import Server, Tenant
from server.api.query import reject_unknown_query
from server.api.schemas import ERROR_RESPONSES, EnsembleCreate, EnsembleList, EnsembleObject

router = APIRouter(responses=ERROR_RESPONSES, dependencies=[Depends(reject_unknown_query)])


def ensemble_object(info: EnsembleInfo) -> EnsembleObject:
    return EnsembleObject(
        id=info.id,
        owner=info.owner,
        name=info.name,
        method=info.method.value,
        prefixes=list(info.members),
        visibility=info.visibility.value,
        description=info.description,
        created_at=info.created_at.isoformat(),
    )


@router.post("/v1/ensembles", response_model=EnsembleObject, status_code=201)
async def create_ensemble(body: EnsembleCreate, server: Server, tenant: Tenant) -> EnsembleObject:
    info = await run_in_threadpool(
        server.ensembles.create,
        tenant,
        body.name,
        body.prefixes,
        method=body.method,
        visibility=body.visibility,
        description=body.description,
    )
    return ensemble_object(info)


@router.get("/v1/ensembles", response_model=EnsembleList)
async def list_ensembles(server: Server, tenant: Tenant) -> EnsembleList:
    found = await run_in_threadpool(server.ensembles.visible, tenant=tenant)
    return EnsembleList(data=[ensemble_object(info) for info in found])


@router.get("/v1/ensembles/{owner}/{name}", response_model=EnsembleObject)
async def get_ensemble(owner: str, name: str, server: Server, tenant: Tenant) -> EnsembleObject:
    info = await run_in_threadpool(server.ensembles.get, f"{owner}/{name}", tenant=tenant)
    return ensemble_object(info)


@router.delete("/v1/ensembles/{owner}/{name}", status_code=204)
async def delete_ensemble(owner: str, name: str, server: Server, tenant: Tenant) -> Response:
    await run_in_threadpool(server.ensembles.delete, f"{owner}/{name}", tenant=tenant)
    return Response(status_code=204)
