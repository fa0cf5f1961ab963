"""One error shape for every 4xx/5xx: {"error": {"type", "message", ...}}.

The one place that knows both sides: the library's and the engine's exceptions are mapped to HTTP
statuses here, by handlers registered once, so routes raise what they get and translate nothing.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from prefixes import PrefixError
from prefixes.errors import (
    AlreadyExists,
    CorruptBlob,
    Incompatible,
    InvalidArgument,
    InvalidState,
    KeyLimit,
    NotFound,
    PoolExhausted,
    QuotaExceeded,
    Unauthorized,
)
from server.engine.engine import EngineStopped
from server.engine.gate import Overloaded
from server.engine.request import (
    ConstraintFailed,
    InvalidRequest,
    NonFiniteOutput,
    RequestFailed,
)
from server.tuning.errors import TuningError

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        type_: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status, self.type, self.message = status, type_, message
        self.headers = headers
        self.extra = extra


def error_body(type_: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"type": type_, "message": message, **extra}}


def error_response(
    status: int, type_: str, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    return JSONResponse(error_body(type_, message, **extra), status_code=status, headers=headers)


_STATUS_TYPES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "overloaded",
    503: "unavailable",
}


def validation_problem(error: dict[str, Any]) -> dict[str, str]:
    """One pydantic/FastAPI validation error as {field, message}, the field a dotted path."""
    if error.get("type") == "json_invalid":
        return {"field": "body", "message": "malformed JSON"}
    # a validator's own step ("function-before[...]") is no part of the field's name
    parts = [str(part) for part in error.get("loc", ()) if part != "body"]
    path = ".".join(part for part in parts if not part.startswith("function-"))
    message = str(error.get("msg", ""))
    if error.get("type") in ("literal_error", "enum") and isinstance(error.get("input"), str):
        message += f", found {error['input'][:64]!r}"  # which of the choices it was not
    return {"field": path or "body", "message": message}


# FastAPI's own answer to a JSON body it cannot even decode (not UTF-8): the same malformed JSON
# as any other, 422 with field "body" (docs/api.md).
_UNPARSABLE_BODY = "There was an error parsing the body"

_PREFIX_STATUS: list[tuple[type[PrefixError], int, str]] = [
    (NotFound, 404, "not_found"),
    (AlreadyExists, 409, "conflict"),
    (KeyLimit, 409, "conflict"),
    (InvalidState, 409, "conflict"),
    (InvalidArgument, 400, "invalid_request"),
    (Unauthorized, 401, "unauthorized"),
    (QuotaExceeded, 422, "quota_exceeded"),
    (Incompatible, 409, "incompatible_prefix"),
    (PoolExhausted, 429, "overloaded"),
    (CorruptBlob, 500, "internal_error"),
]
# What the handlers below translate; anything else is a bug: 500.
LibraryError = (
    PrefixError | Overloaded | EngineStopped | RequestFailed | InvalidRequest | TuningError
)


def to_api_error(exc: LibraryError) -> ApiError:
    """The HTTP error for an exception raised by the registry or the engine."""
    if isinstance(exc, PrefixError):
        extra = {k: v for k, v in exc.to_dict().items() if k not in ("type", "message")}
        for kind, status, type_ in _PREFIX_STATUS:
            if isinstance(exc, kind):
                headers = {"Retry-After": "1"} if status == 429 else None
                return ApiError(status, type_, exc.message, headers=headers, **extra)
        return ApiError(422, "invalid_prefix", exc.message, **extra)
    if isinstance(exc, Overloaded):
        retry = str(max(1, round(exc.retry_after)))
        return ApiError(429, "overloaded", str(exc), headers={"Retry-After": retry})
    if isinstance(exc, TuningError):
        if exc.line is None:
            return ApiError(400, "invalid_request", exc.message, field=exc.field)
        return ApiError(400, "invalid_request", exc.message, field=exc.field, line=exc.line)
    if isinstance(exc, EngineStopped):
        return ApiError(503, "unavailable", str(exc))
    if isinstance(exc, NonFiniteOutput):
        return ApiError(422, "numerical_overflow", str(exc))
    if isinstance(exc, ConstraintFailed):
        return ApiError(422, "constraint_failed", str(exc))
    if isinstance(exc, RequestFailed):
        return ApiError(500, "generation_failed", str(exc))
    # InvalidRequest: the engine's message begins with the field it names
    return ApiError(400, "invalid_request", str(exc), field=str(exc).partition(":")[0])


HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path (RFC 9110's `Allow`): the router answers 405
    from the first route whose path matches, which may not be the only one there."""
    routes = request.app.router.routes
    return [
        method
        for method in HTTP_METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes
        )
    ]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.type, exc.message, exc.headers, **exc.extra)

    async def _library_error(request: Request, exc: Exception) -> JSONResponse:
        return await _api_error(request, to_api_error(exc))  # type: ignore[arg-type]

    for kind in (
        PrefixError,
        Overloaded,
        EngineStopped,
        RequestFailed,
        InvalidRequest,
        TuningError,
    ):
        app.add_exception_handler(kind, _library_error)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [validation_problem(e) for e in exc.errors()]
        summary = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        return error_response(422, "invalid_request", summary, details=problems)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == _UNPARSABLE_BODY:
            return error_response(422, "invalid_request", "body: malformed JSON", field="body")
        type_ = _STATUS_TYPES.get(exc.status_code, "error")
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(request))}
        return error_response(exc.status_code, type_, str(exc.detail), headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, "internal_error", "internal server error")
