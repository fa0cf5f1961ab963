"""Request body limits, enforced as bytes arrive: before parsing, before authentication.

FastAPI reads and parses a JSON body before it runs any dependency, so without this a client
without a key could make the server read and parse a body of any size. Here a body whose
declared length is over the route's limit is refused at once, and one sent without a length
(chunked) is cut off as soon as it passes the limit.

A body refused by its declared length is drained (read and discarded, up to `DRAIN_BYTES` and
`DRAIN_SECONDS`) before the 413 is sent: a client still sending when the server answers and
closes sees "connection reset" instead of the 413 (Python's urllib does), so every common client
reads the JSON error. A client that asked `Expect: 100-continue` has sent nothing yet: it gets the
413 at once (reading would tell it to go on). A body cut off while it streams is left to the
server (uvicorn discards what the app did not read).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from contextlib import suppress

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import error_body

# How much of a refused body is read and thrown away so the client sees the answer.
DRAIN_BYTES = 64 << 20
DRAIN_SECONDS = 10.0

# (limit in bytes, what the body is called in the error) for a request's method and path.
LimitFor = Callable[[str, str], tuple[int, str]]


class BodyTooLarge(HTTPException):
    """An HTTPException, so FastAPI's body parsing passes it through as the 413 it is."""

    def __init__(self, what: str, limit: int, found: int | None) -> None:
        found_text = f"{found} bytes" if found is not None else "more"
        super().__init__(413, f"{what}: expected at most {limit} bytes, found {found_text}")


class BodyLimit:
    """Pure ASGI middleware: the limit applies to the raw bytes, whatever the route does."""

    def __init__(self, app: ASGIApp, limit_for: LimitFor) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, what = self.limit_for(scope["method"], scope["path"])
        declared = content_length(scope)
        if declared is not None and declared > limit:
            if header(scope, b"expect").lower() != b"100-continue":
                with suppress(TimeoutError):
                    await asyncio.wait_for(drain(receive), DRAIN_SECONDS)
            await send_413(send, BodyTooLarge(what, limit, declared))
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(what, limit, None)
            return message

        await self.app(scope, limited, send)


def header(scope: Scope, name: bytes) -> bytes:
    return next((value for key, value in scope["headers"] if key == name), b"")


def content_length(scope: Scope) -> int | None:
    value = header(scope, b"content-length")
    return int(value) if value.isdigit() else None


async def drain(receive: Receive) -> None:
    """Read and discard the rest of the body, up to DRAIN_BYTES; stop if the client leaves."""
    drained = 0
    while drained <= DRAIN_BYTES:
        message = await receive()
        if message["type"] != "http.request":
            return
        drained += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


async def send_413(send: Send, error: BodyTooLarge) -> None:
    body = json.dumps(error_body("payload_too_large", error.detail)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
