"""Prefix endpoints: upload (multipart), list, get, export (a zip of PEFT's files), delete."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from prefixes.formats.peft_export import zip_archive
from server.api.auth import Server, Tenant
from server.api.errors import ApiError
from server.api.forms import read_form
from server.api.query import reject_unknown_query
from server.api.schemas import ERROR_RESPONSES, PrefixInfo, PrefixPage, PrefixUpdate

router = APIRouter(responses=ERROR_RESPONSES, dependencies=[Depends(reject_unknown_query)])
MAX_FILES = 8


async def read_upload_form(request: Request) -> tuple[dict[str, str], dict[str, bytes]]:
    """The form's fields and files."""
    form = await read_form(request, max_files=MAX_FILES, max_fields=16)
    fields: dict[str, str] = {}
    files: dict[str, bytes] = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            if key != "files":
                raise ApiError(
                    422, "invalid_request", f"{key}: files go in the field 'files'", field=key
                )
            name = check_file_name(value.filename or "")
            if name in files:
                raise ApiError(
                    422, "invalid_request", f"files: {name} was sent twice", field="files"
                )
            files[name] = await value.read()
        elif key == "files":  # a file part without a filename parses as a plain field
            raise ApiError(
                422,
                "invalid_request",
                "files: every file needs a file name (filename=...)",
                field="files",
            )
        else:
            fields[key] = value
    return fields, files


def check_file_name(name: str) -> str:
    """A file's name as PEFT wrote it: a plain name, never a path."""
    if "/" in name or "\\" in name or name in ("", ".", ".."):
        raise ApiError(
            422,
            "invalid_request",
            f"files: expected plain file names such as adapter_config.json, found {name!r}",
            field="files",
        )
    return name


def flag(fields: dict[str, str], key: str) -> bool:
    value = fields.get(key, "false").strip().lower()
    if value not in ("true", "false", "1", "0"):
        raise ApiError(422, "invalid_request", f"{key}: expected true or false, found {value!r}")
    return value in ("true", "1")


@router.post(
    "/v1/prefixes",
    status_code=201,
    response_model=PrefixInfo,
    openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {
        "schema": {
            "type": "object",
            "required": ["name", "files"],
            "additionalProperties": False,
            "properties": {
                "name": {"type": "string"},
                "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                "visibility": {"type": "string", "enum": ["private", "public"]},
                "description": {"type": "string"},
                "overwrite": {"type": "boolean"},
            },
        },
    }}}},
)  # fmt: skip
async def upload(request: Request, server: Server, tenant: Tenant) -> dict[str, Any]:
    fields, files = await read_upload_form(request)
    unknown = set(fields) - {"name", "visibility", "description", "overwrite"}
    if unknown:
        raise ApiError(422, "invalid_request", f"unknown fields: {sorted(unknown)}")
    if "name" not in fields:
        raise ApiError(422, "invalid_request", "name: required")
    if not files:
        raise ApiError(422, "invalid_request", "files: expected at least one file", field="files")
    info = await run_in_threadpool(
        server.registry.upload,
        tenant,
        fields["name"],
        files,
        visibility=fields.get("visibility"),
        description=fields.get("description", ""),
        overwrite=flag(fields, "overwrite"),
    )
    return info.to_dict()


@router.get("/v1/prefixes", response_model=PrefixPage)
async def list_prefixes(
    server: Server,
    tenant: Tenant,
    scope: Literal["own", "public", "all"] = "all",  # prefixes.catalog.records.Scope's values
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: str | None = None,
) -> dict[str, Any]:
    page = await run_in_threadpool(
        server.registry.list_prefixes, tenant=tenant, scope=scope, limit=limit, cursor=cursor
    )
    return {"data": [info.to_dict() for info in page.items], "next": page.next_cursor}


@router.get("/v1/prefixes/{owner}/{name}", response_model=PrefixInfo)
async def get_prefix(owner: str, name: str, server: Server, tenant: Tenant) -> dict[str, Any]:
    info = await run_in_threadpool(server.registry.get, f"{owner}/{name}", tenant=tenant)
    return info.to_dict()


@router.patch("/v1/prefixes/{owner}/{name}", response_model=PrefixInfo)
async def update_prefix(
    owner: str, name: str, body: PrefixUpdate, server: Server, tenant: Tenant
) -> dict[str, Any]:
    """Visibility and description, in place (the owner's only: 404 for anyone else)."""
    info = await run_in_threadpool(
        server.registry.update,
        f"{owner}/{name}",
        tenant=tenant,
        visibility=body.visibility,
        description=body.description,
    )
    return info.to_dict()


ZIP = "application/zip"
ADAPTER_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "a zip archive of adapter_config.json and adapter_model.safetensors, "
        "the folder PeftModel.from_pretrained loads",
        "content": {ZIP: {"schema": {"type": "string", "format": "binary"}}},
    }
}


@router.get(
    "/v1/prefixes/{owner}/{name}/adapter", response_class=Response, responses=ADAPTER_RESPONSE
)
async def export_adapter(
    owner: str,
    name: str,
    server: Server,
    tenant: Tenant,
    version: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
) -> Response:
    info, files = await run_in_threadpool(
        server.registry.export,
        f"{owner}/{name}",
        tenant=tenant,
        version=version,
        base_model=server.loaded.model_id,
    )
    return Response(
        zip_archive(files),
        media_type=ZIP,
        headers={
            "Content-Disposition": f'attachment; filename="{info.name}-v{info.version}.zip"',
            "X-Prefix-Version": str(info.version),
        },
    )


@router.delete("/v1/prefixes/{owner}/{name}", status_code=204)
async def delete_prefix(owner: str, name: str, server: Server, tenant: Tenant) -> Response:
    await run_in_threadpool(server.registry.delete, f"{owner}/{name}", tenant=tenant)
    return Response(status_code=204)
