"""Run one buffered HTTP request through an ASGI app in this process and hand the response on
as the app sends it: first its start (status and headers), then each chunk of its body.

A replica runs the whole single-process app this way, so every route, error and stream of the
HTTP contract is the same code; only the bytes travel between Ray actors. Closing the generator
early (the client went away) tells the app `http.disconnect`, as a server would.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message

log = logging.getLogger(__name__)

Headers = list[tuple[bytes, bytes]]
# How long an app that was told the client left may take to finish before it is cancelled.
DISCONNECT_GRACE_S = 5.0


@dataclass(frozen=True)
class HttpCall:
    """One HTTP request, read in full by the router."""

    method: str
    path: str
    query_string: bytes = b""
    headers: Headers = field(default_factory=list)
    body: bytes = b""
    client: tuple[str, int] | None = None

    def scope(self) -> dict[str, Any]:
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": self.method,
            "scheme": "http",
            "path": self.path,
            "raw_path": self.path.encode(),
            "root_path": "",
            "query_string": self.query_string,
            "headers": self.headers,
            "client": self.client,
            "server": None,
            "state": {},
        }


@dataclass(frozen=True)
class ResponseStart:
    status: int
    headers: Headers

    def with_header(self, name: str, value: str) -> ResponseStart:
        return ResponseStart(self.status, [*self.headers, (name.encode(), value.encode())])

    def header(self, name: str) -> str | None:
        wanted = name.lower().encode()
        return next((v.decode() for k, v in self.headers if k.lower() == wanted), None)


async def call_app(app: ASGIApp, call: HttpCall) -> AsyncIterator[ResponseStart | bytes]:
    """Yield the response's start, then its body chunks, as the app sends them."""
    sent: asyncio.Queue[Message | None] = asyncio.Queue()
    disconnected = asyncio.Event()
    body_given = False

    async def receive() -> Message:
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": call.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        await sent.put(message)

    async def run() -> None:
        try:
            await app(call.scope(), receive, send)
        finally:
            await sent.put(None)

    task = asyncio.create_task(run())
    try:
        while (message := await sent.get()) is not None:
            if message["type"] == "http.response.start":
                yield ResponseStart(message["status"], list(message.get("headers", [])))
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                if not message.get("more_body", False):
                    break
    finally:
        disconnected.set()
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_GRACE_S)
        if not done:
            task.cancel()
        elif task.exception() is not None:  # already answered (a 500 at worst): log it only
            log.error("request %s %s failed", call.method, call.path, exc_info=task.exception())
