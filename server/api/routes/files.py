"""Training files, OpenAI's `/v1/files`: a tenant's JSONL files, checked line by line on upload.
Another tenant's files are 404."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from prefixes.tuning.records import FILE_PURPOSE, FileInfo
from server.api.auth import Server, Tenant
from server.api.errors import ApiError
from server.api.forms import read_form
from server.api.query import reject_unknown_query
from server.api.schemas import ERROR_RESPONSES, FileDeleted, FileList, FileObject
from server.tuning.data import parse_records

router = APIRouter(responses=ERROR_RESPONSES, dependencies=[Depends(reject_unknown_query)])
MAX_FILENAME = 255


def file_object(info: FileInfo) -> FileObject:
    return FileObject(
        id=info.id,
        bytes=info.bytes,
        created_at=int(info.created_at.timestamp()),
        filename=info.filename,
        purpose=info.purpose,
    )


@router.post(
    "/v1/files",
    response_model=FileObject,
    openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {
        "schema": {
            "type": "object",
            "required": ["file", "purpose"],
            "additionalProperties": False,
            "properties": {
                "file": {"type": "string", "format": "binary"},
                "purpose": {"type": "string", "enum": [FILE_PURPOSE]},
            },
        },
    }}}},
)  # fmt: skip
async def upload_file(request: Request, server: Server, tenant: Tenant) -> FileObject:
    form = await read_form(request, max_files=1, max_fields=4)
    fields: dict[str, str] = {}
    upload: UploadFile | None = None
    for key, value in form.multi_items():
        if key == "file" and isinstance(value, UploadFile):
            upload = value
        elif key == "purpose" and isinstance(value, str):
            fields[key] = value
        else:
            raise ApiError(400, "invalid_request", f"{key}: not a field of this route", field=key)
    purpose = fields.get("purpose")
    if purpose != FILE_PURPOSE:
        raise ApiError(
            400, "invalid_request",
            f"purpose: expected {FILE_PURPOSE!r}, found {purpose!r:.40}", field="purpose",
        )  # fmt: skip
    if upload is None:
        raise ApiError(400, "invalid_request", "file: expected one file part", field="file")
    filename = upload.filename or ""
    if not 1 <= len(filename) <= MAX_FILENAME:
        raise ApiError(
            400, "invalid_request",
            f"file: expected a file name of 1 to {MAX_FILENAME} characters, found {len(filename)}",
            field="file",
        )  # fmt: skip
    content = await upload.read()
    records = await run_in_threadpool(parse_records, content)
    info = await run_in_threadpool(
        server.tuning.add_file, tenant, filename, purpose, content, len(records)
    )
    return file_object(info)


@router.get("/v1/files", response_model=FileList)
async def list_files(
    server: Server,
    tenant: Tenant,
    purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: str | None = None,
) -> FileList:
    page = await run_in_threadpool(
        server.tuning.list_files, tenant, purpose=purpose, limit=limit, after=after
    )
    data = [file_object(info) for info in page.items]
    return FileList(
        data=data,
        has_more=page.has_more,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )


@router.get("/v1/files/{file_id}", response_model=FileObject)
async def get_file(file_id: str, server: Server, tenant: Tenant) -> FileObject:
    return file_object(await run_in_threadpool(server.tuning.get_file, tenant, file_id))


@router.get(
    "/v1/files/{file_id}/content",
    response_class=Response,
    responses={200: {"content": {"application/jsonl": {}}, "description": "the file as sent"}},
)
async def file_content(file_id: str, server: Server, tenant: Tenant) -> Response:
    content = await run_in_threadpool(server.tuning.file_content, tenant, file_id)
    return Response(content, media_type="application/jsonl")


@router.delete("/v1/files/{file_id}", response_model=FileDeleted)
async def delete_file(file_id: str, server: Server, tenant: Tenant) -> dict[str, Any]:
    info = await run_in_threadpool(server.tuning.delete_file, tenant, file_id)
    return {"id": info.id, "object": "file", "deleted": True}
