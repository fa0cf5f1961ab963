"""OpenAI's x-ratelimit-* headers on every response to a tenant's key, and the 429 beyond.

The admission that decides them (auth for requests, generation for tokens) leaves its figures
in the request's state; this middleware writes them into the response head, whatever answers
(a route's body, a stream, an error handler), so no route has to remember.
"""

from __future__ import annotations

import math

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
