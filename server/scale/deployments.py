"""The Ray Serve application: a light HTTP router in front of N replicas of the whole server.

    Serve's HTTP proxy -> Router -> Replica x N (each: model, engine, registry pool on its device)
                                  \\-> MetricsBoard (every replica's /metrics, one scrape)

The router reads the prefix a request generates with (server/scale/affinity.py) and passes it
as Serve's multiplexed model id, so requests for one prefix prefer the replica that already
holds it and base-model requests go to the least loaded one. A replica runs the unchanged
single-process app on each request (server/scale/asgi.py) and adds `X-Replica` to every
response. Replicas share the registry's database and the prefix files (docs/scale-out.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator
from typing import Any, cast

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from ray import serve
from ray.exceptions import RayError
from ray.serve.exceptions import BackPressureError, RayServeException
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from server.api.app import create_app
from server.api.errors import error_body, error_response
from server.api.services import Services
from server.config import Settings
from server.scale.affinity import affinity_key
from server.scale.asgi import HttpCall, ResponseStart, call_app
from server.scale.metrics_board import Board

log = logging.getLogger("prefix_server")

REPLICA_HEADER = "x-replica"
REPORT_INTERVAL_S = 5.0
# Prefix references Serve remembers per replica for routing (LRU). Only bookkeeping: the
# registry's pool decides what stays on the device.
MAX_AFFINITY_IDS = 4096
ROUTER_MAX_ONGOING = 4096


# Each replica reports every few seconds: no access log line per report.
@serve.deployment(ray_actor_options={"num_cpus": 0}, logging_config={"enable_access_log": False})
class MetricsBoard:
    def __init__(self) -> None:
        self._board = Board(stale_after=3 * REPORT_INTERVAL_S)

    def report(self, replica: str, text: str) -> None:
        self._board.report(replica, text)

    def render(self) -> bytes:
        return self._board.render()


@serve.deployment
class Replica:
    async def __init__(self, settings: Settings, board: DeploymentHandle) -> None:  # type: ignore[misc]
        logging.getLogger("prefix_server").setLevel(settings.log_level.upper())
        self.id = serve.get_replica_context().replica_id.unique_id
        self._app = create_app(settings, background_start=False)
        self._lifespan = self._app.router.lifespan_context(self._app)
        await self._lifespan.__aenter__()  # loads the model, opens the registry, starts the engine
        self._services: Services = self._app.state.services
        if not self._services.ready:  # Serve logs this and starts another replica
            raise RuntimeError(f"replica failed to start: {self._services.startup_error}")
        self._board = board
        self._reporter = asyncio.create_task(self._report_metrics())

    @serve.multiplexed(max_num_models_per_replica=MAX_AFFINITY_IDS)
    async def _affinity(self, prefix: str) -> str:
        """Serve learns from this call that `prefix` is here; the registry loads the KV."""
        return prefix

    async def handle(self, call: HttpCall) -> AsyncIterator[ResponseStart | bytes]:
        """The app's response to `call`: its start (with X-Replica), then its body chunks."""
        prefix = serve.get_multiplexed_model_id()
        if prefix:
            await self._affinity(prefix)
        async for part in call_app(self._app, call):
            yield (
                part.with_header(REPLICA_HEADER, self.id)
                if isinstance(part, ResponseStart)
                else part
            )

    def model_id(self) -> str:
        return self._services.model_id

    def check_health(self) -> None:
        """Serve calls this periodically; raising makes it replace the replica."""
        engine = self._services.engine
        if not (self._services.ready and engine is not None and engine.alive):
            raise RuntimeError("the engine is not running")

    def metrics_text(self) -> str:
        return generate_latest(self._app.state.metrics_registry).decode()

    async def _report_metrics(self) -> None:
        while True:
            try:
                await self._board.report.remote(self.id, self.metrics_text())
            except Exception:  # the board restarts with its actor: report again next time
                log.warning("replica %s: reporting metrics failed", self.id, exc_info=True)
            await asyncio.sleep(REPORT_INTERVAL_S)

    async def __del__(self) -> None:
        """Serve's graceful shutdown: finish running requests (--shutdown-grace), then stop."""
        self._reporter.cancel()
        await self._lifespan.__aexit__(None, None, None)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=ROUTER_MAX_ONGOING)
class Router:
    def __init__(self, replicas: DeploymentHandle, board: DeploymentHandle, max_body: int) -> None:
        """`max_body`: the largest body any route accepts; the replica applies each route's own
        limit, the router only refuses to hold more than that in memory."""
        self._replicas = replicas
        self._board = board
        self._max_body = max_body
        self._base_model: str | None = None
        self.id = "router-" + serve.get_replica_context().replica_id.unique_id

    async def __call__(self, request: Request) -> Response:
        response = await self._answer(request)
        # What the router answers itself (metrics, 413, 429, 503) names the router.
        if REPLICA_HEADER not in response.headers:
            response.headers[REPLICA_HEADER] = self.id
        return response

    async def _answer(self, request: Request) -> Response:
        if request.method == "GET" and request.url.path == "/metrics":
            return Response(await self._board.render.remote(), media_type=CONTENT_TYPE_LATEST)
        body = await self._body(request)
        if body is None:
            message = f"request body: expected at most {self._max_body} bytes, found more"
            return error_response(413, "payload_too_large", message)
        client = (request.client.host, request.client.port) if request.client else None
        call = HttpCall(
            request.method,
            request.url.path,
            request.url.query.encode(),
            list(request.headers.raw),
            body,
            client,
        )
        handle = self._replicas.options(
            method_name="handle", stream=True, multiplexed_model_id=await self._prefix_of(call)
        )
        parts = cast(DeploymentResponseGenerator, handle.remote(call))
        try:
            start = await parts.__anext__()
        except BackPressureError:
            return error_response(
                429, "overloaded", "every replica's queue is full; retry later",
                headers={"Retry-After": "1"},
            )  # fmt: skip
        except (RayError, RayServeException) as exc:
            return error_response(503, "unavailable", _stopped(exc), headers={"Retry-After": "1"})
        response = StreamingResponse(_rest(parts, start), status_code=start.status)
        response.raw_headers = list(start.headers)
        return response

    async def _body(self, request: Request) -> bytes | None:
        """The whole body, or None past `max_body` (checked as it arrives)."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self._max_body:
            return None
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self._max_body:
                return None
        return bytes(body)

    async def _prefix_of(self, call: HttpCall) -> str:
        key = affinity_key(call.method, call.path, call.body)
        if key and self._base_model is None:
            self._base_model = await self._replicas.model_id.remote()
        return "" if key == self._base_model else key


async def _rest(parts: DeploymentResponseGenerator, start: ResponseStart) -> AsyncIterator[bytes]:
    """The body after the start. A replica dying now cannot change the status any more: a
    stream gets an error event and [DONE]; any other body is cut short (the client sees an
    incomplete response, never a hang)."""
    finished = False
    try:
        async for chunk in parts:
            yield chunk
        finished = True
    except (RayError, RayServeException) as exc:
        finished = True
        if not (start.header("content-type") or "").startswith("text/event-stream"):
            raise
        error = error_body("unavailable", _stopped(exc))
        yield f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode()
    finally:
        if not finished:  # the client went away: stop the request on its replica
            parts.cancel()


def _stopped(exc: BaseException) -> str:
    return f"the replica serving this request stopped ({type(exc).__name__}); retry it"


def build_app(settings: Settings) -> Any:
    """The application `serve.run` deploys."""
    board = MetricsBoard.bind()  # type: ignore[attr-defined]
    replicas = Replica.options(**replica_options(settings)).bind(settings, board)  # type: ignore[attr-defined]
    largest = max(
        settings.max_request_bytes, settings.max_upload_bytes, settings.max_training_file_bytes
    )
    return Router.bind(replicas, board, largest)  # type: ignore[attr-defined]


def replica_options(settings: Settings) -> dict[str, Any]:
    """Resources, queue bounds and scaling of the replicas (docs/scale-out.md)."""
    resources: dict[str, float] = {"num_cpus": settings.replica_cpus}
    if settings.device == "cuda":
        resources["num_gpus"] = 1
    options: dict[str, Any] = {
        "ray_actor_options": resources,
        # Twice the rows it decodes together: the engine always has the next requests queued
        # when rows finish, and the rest wait in the router, free to go to another replica.
        "max_ongoing_requests": 2 * settings.num_slots,
        # Beyond this many waiting in the router, 429 (as the engine's own --max-waiting).
        "max_queued_requests": settings.max_waiting,
        "graceful_shutdown_timeout_s": settings.shutdown_grace + 5,
        "health_check_period_s": 10,
    }
    low = settings.replicas or 1
    high = settings.max_replicas or low
    if high > low:
        options["autoscaling_config"] = {
            "min_replicas": low,
            "max_replicas": high,
            # A replica is busy when every row it decodes together is in use.
            "target_ongoing_requests": settings.num_slots,
            "upscale_delay_s": 30,
            "downscale_delay_s": 300,
        }
    else:
        options["num_replicas"] = low
    return options


def app_builder(args: dict[str, Any]) -> Any:
    """`serve deploy deploy/serve.yaml`: `args` are Settings fields; PREFIX_SERVER_* variables
    fill the rest."""
    # Serve may build the application on a node without a GPU: CUDA is checked where the
    # replicas load the model, not here.
    device = args.get("device") or os.environ.get("PREFIX_SERVER_DEVICE", "cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device: expected cpu or cuda, found {device!r}")
    settings = Settings(**{**args, "device": "cpu"}).model_copy(update={"device": device})
    if settings.admin_key is None:
        raise ValueError(
            "admin_key: expected one (PREFIX_SERVER_ADMIN_KEY) on a cluster, found none"
        )
    return build_app(settings)
