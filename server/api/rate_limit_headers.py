"""OpenAI's x-ratelimit-* headers on every response to a tenant's key, and the 429 beyond.

The admission that decides them (auth for requests, generation for tokens) leaves its figures
in the request's state; this middleware writes them into the response head, whatever answers
(a route's body, a stream, an error handler), so no route has to remember.
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import ApiError
from server.api.rate_limits import RateLimited, Snapshot

STATE_KEY = "rate_limit_snapshot"


def show_rate_limits(request: Request, snapshot: Snapshot) -> None:
    """The figures this response's headers carry (the latest admission's)."""
    setattr(request.state, STATE_KEY, snapshot)


def rate_limited(request: Request, exc: RateLimited) -> ApiError:
    show_rate_limits(request, exc.snapshot)
    # A whole number of seconds, at least 1, as HTTP's Retry-After takes; a limit of 0 never
    # clears by waiting: a minute, the time for the admin to raise it.
    seconds = 60 if math.isinf(exc.retry_after) else max(1, math.ceil(exc.retry_after))
    return ApiError(429, "rate_limited", str(exc), headers={"Retry-After": str(seconds)})


class RateLimitHeaders:
    """Pure ASGI middleware, so it reaches streamed responses and error handlers too."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})  # the dict request.state writes into

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                snapshot: Snapshot | None = state.get(STATE_KEY)
                if snapshot is not None:
                    extra = [(k.encode(), v.encode()) for k, v in snapshot.headers().items()]
                    message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, with_headers)


# The headers in the OpenAPI document: in components, referred to by every response of every
# operation that takes a key (sent only on answers to a tenant's key: none is `required`), and
# Retry-After on every 429 (the rate limits' and the engine's, which always send it).
_COUNT = {"type": "integer", "minimum": 0}
_DURATION = {
    "type": "string",
    "pattern": r"^([0-9]+ms|([0-9]+m)?[0-9]+(\.[0-9]+)?s)$",
    "examples": ["0s", "250ms", "6s", "1m30s"],
}
_RATE_LIMIT_HEADERS: dict[str, tuple[str, dict[str, Any]]] = {
    "x-ratelimit-limit-requests": ("the tenant's requests per minute (on this replica)", _COUNT),
    "x-ratelimit-remaining-requests": ("requests left in the window after this one", _COUNT),
    "x-ratelimit-reset-requests": ("time until the requests window is empty again", _DURATION),
    "x-ratelimit-limit-tokens": ("the tenant's tokens per minute (on this replica)", _COUNT),
    "x-ratelimit-remaining-tokens": ("tokens left after this call's reservation", _COUNT),
    "x-ratelimit-reset-tokens": ("time until the tokens window is empty again", _DURATION),
}
RETRY_AFTER = {
    "description": "whole seconds until the same call may succeed",
    "required": True,
    "schema": {"type": "integer", "minimum": 1},
}


def declare_rate_limit_headers(document: dict[str, Any]) -> dict[str, Any]:
    """The document, its responses declaring the headers this middleware and the 429s send."""
    components = document.setdefault("components", {}).setdefault("headers", {})
    for name, (text, schema) in _RATE_LIMIT_HEADERS.items():
        components[name] = {
            "description": f"{text}; sent on every answer to a tenant's key",
            "schema": schema,
        }
    components["Retry-After"] = RETRY_AFTER
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            if not isinstance(operation, dict) or "security" not in operation:
                continue
            for status, response in operation.get("responses", {}).items():
                headers = response.setdefault("headers", {})
                for name in _RATE_LIMIT_HEADERS:
                    headers[name] = {"$ref": f"#/components/headers/{name}"}
                if status == "429":
                    headers["Retry-After"] = {"$ref": "#/components/headers/Retry-After"}
    return document
