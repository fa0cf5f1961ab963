"""Every request: an X-Request-ID, one JSON log line, and the HTTP metrics.

A pure ASGI middleware (not Starlette's BaseHTTPMiddleware, which runs the app in a task of its
own and re-wraps `receive`): the body limit's errors and a client's disconnect reach the app as
they are. It is the outermost layer, so every answer carries the id and is counted: the body
limit's early 413s, and the 500 of a bug, which it sends itself. Everything a client controls
that ends up in a label or a log line is bounded: the method (an unknown one is counted as
"other", so a client cannot mint Prometheus series) and the request id (a client's own is kept
only if short and printable).
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import error_body
from server.api.metrics import HttpMetrics

log = logging.getLogger("prefix_server")

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class AccessLog:
    def __init__(self, app: ASGIApp, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_of(scope)
        started = time.perf_counter()
        started_response = False

        async def send_with_id(message: Message) -> None:
            nonlocal started_response
            if message["type"] == "http.response.start":
                started_response, status = True, message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", request_id.encode())]}
                self.record(scope, request_id, status, time.perf_counter() - started)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # A bug: answered here, so the 500 carries the request id the log line names too.
            log.exception("unhandled error (request %s)", request_id)
            if started_response:  # a stream already under way: all that is left is to close it
                return
            body = json.dumps(error_body("internal_error", "internal server error")).encode()
            await send_with_id(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send_with_id({"type": "http.response.body", "body": body})

    def record(self, scope: Scope, request_id: str, status: int, elapsed: float) -> None:
        """At the response's start: for a stream, the time until its first byte."""
        route = getattr(scope.get("route"), "path", None) or matched_path(scope)
        method = scope["method"] if scope["method"] in METHODS else "other"
        self.metrics.requests.labels(route, method, str(status)).inc()
        self.metrics.latency.labels(route).observe(elapsed)
        log.info(
            json.dumps(
                {
                    "event": "request",
                    "request_id": request_id,
                    "method": method,
                    "route": route,
                    "status": status,
                    "ms": round(elapsed * 1000, 1),
                }
            )
        )


def matched_path(scope: Scope) -> str:
    """The path template of the app's route that matches, for routes the framework does not
    record in the scope (the OpenAPI document and its pages); "unmatched" for none: a bounded
    label whatever paths clients send."""
    app = scope.get("app")
    for route in getattr(getattr(app, "router", None), "routes", ()):
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return str(getattr(route, "path", "unmatched"))
    return "unmatched"


def request_id_of(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if _CLIENT_REQUEST_ID.fullmatch(text):
                return text
    return uuid.uuid4().hex[:16]
