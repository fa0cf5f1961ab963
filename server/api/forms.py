"""Multipart forms (uploads): read whole, then parsed within bounds; a malformed one is a 400."""

from __future__ import annotations

from fastapi import Request
from starlette.datastructures import FormData

from server.api.errors import ApiError


async def read_form(request: Request, *, max_files: int, max_fields: int) -> FormData:
    """The body's size limit is the BodyLimit middleware's."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(415, "unsupported_media_type", "upload: expected multipart/form-data")
    # Read whole first, so that BodyLimit's 413 surfaces here and not as a "malformed
    # multipart" 400 from the broad except around form() below.
    await request.body()
    try:
        return await request.form(max_files=max_files, max_fields=max_fields)
    except Exception as exc:  # malformed multipart, too many parts
        raise ApiError(
            400, "invalid_request", f"upload: malformed multipart body ({exc})"
        ) from None
