"""Map the library's exceptions to HTTP errors: the one place that knows both sides."""

from __future__ import annotations

from prefixes import PrefixError
from prefixes.errors import (
    AlreadyExists,
    CorruptBlob,
    Incompatible,
    NotFound,
    PoolExhausted,
    QuotaExceeded,
    Unauthorized,
)
from server.api.errors import ApiError
from server.engine.engine import EngineStopped
from server.engine.scheduler import Overloaded
from server.engine.stream import NonFiniteOutput, RequestFailed

_PREFIX_STATUS: list[tuple[type[PrefixError], int, str]] = [
    (NotFound, 404, "not_found"),
    (AlreadyExists, 409, "conflict"),
    (Unauthorized, 401, "unauthorized"),
    (QuotaExceeded, 422, "quota_exceeded"),
    (Incompatible, 409, "incompatible_prefix"),
    (PoolExhausted, 429, "overloaded"),
    (CorruptBlob, 500, "internal_error"),
]


def to_api_error(exc: Exception) -> ApiError:
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
    if isinstance(exc, EngineStopped):
        return ApiError(503, "unavailable", str(exc))
    if isinstance(exc, NonFiniteOutput):
        return ApiError(422, "numerical_overflow", str(exc))
    if isinstance(exc, RequestFailed):
        return ApiError(500, "generation_failed", str(exc))
    if isinstance(exc, ValueError):
        return ApiError(400, "invalid_request", str(exc))
    raise exc
