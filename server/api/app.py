"""The FastAPI app factory and its lifespan: load the model, open the registry, run the engine.

The model loads in the background after the server starts listening, so /health answers 503
while it loads (instead of refusing connections) and 200 once the engine runs.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import RedirectResponse
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from prefixes.catalog.ensembles import Ensembles
from prefixes.catalog.records import RateLimits
from prefixes.registry import Registry
from prefixes.storage.checkpoint_files import CheckpointFiles
from prefixes.tuning.checkpointing import Checkpoints
from prefixes.tuning.records import Limits
from prefixes.tuning.tuning import Tuning
from prefixes.usage.flusher import UsageFlusher
from prefixes.usage.ledger import UsageLedger
from server.api import console
from server.api.access_log import AccessLog
from server.api.ensemble_metrics import EnsembleMetrics
from server.api.errors import install_error_handlers
from server.api.limits import BodyLimit
from server.api.metrics import EngineCollector, HttpMetrics
from server.api.openapi_bounds import ServedModel, state_server_bounds
from server.api.pins import TenantPins
from server.api.rate_limit_headers import RateLimitHeaders, declare_rate_limit_headers
from server.api.rate_limits import RateLimiter
from server.api.routes import (
    ensembles,
    files,
    fine_tuning,
    generate,
    health,
    openai,
    prefixes,
    tenants,
    tokenizer,
    transferability,
    usage,
)
from server.api.services import Services
from server.config import Settings
from server.device_share import DeviceShare
from server.engine.engine import Engine
from server.models import LoadedModel, load_model
from server.tuning.worker import TuningWorker

log = logging.getLogger("prefix_server")


def create_app(
    settings: Settings, *, loaded: LoadedModel | None = None, background_start: bool = True
) -> FastAPI:
    """`loaded` injects an already loaded model (tests); otherwise `settings.model` is loaded."""
    state = Services(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        starting = asyncio.create_task(asyncio.to_thread(start_services, state, loaded))
        if not background_start:
            await starting
        try:
            yield
        finally:
            await starting  # a start still loading finishes first, then everything stops
            await asyncio.to_thread(stop_services, state)

    # /docs and /redoc load their scripts from the package, never from a CDN: the server
    # must work on a machine with no internet.
    app = FastAPIOffline(
        title="prefix-server",
        summary="One frozen LLM, thousands of personal prefixes, one batch.",
        version="0.1.0",
        lifespan=lifespan,
        # A path with a stray "/" is a 404 in the error shape, not a redirect to another
        # method's route (DELETE .../keys/ would redirect to .../keys).
        redirect_slashes=False,
    )
    app.state.services = state
    install_error_handlers(app)
    routers = (health, tenants, prefixes, ensembles, generate, openai, files, fine_tuning, usage)
    for module in (*routers, transferability):
        app.include_router(module.router)
    app.include_router(tokenizer.router)  # vLLM's /tokenize, /detokenize, /tokenizer_info
    app.include_router(console.router)  # the web console's static files (docs/console.md)
    document = app.openapi

    def openapi() -> dict[str, Any]:
        """FastAPI's document, with this server's limits written in: built once the model is
        loaded (its vocabulary bounds token ids), and until then without the model's bounds."""
        if app.openapi_schema is not None:
            return app.openapi_schema
        loaded = state.loaded
        served = None if loaded is None else ServedModel(loaded.model_id, loaded.spec.vocab_size)
        built = state_server_bounds(copy.deepcopy(document()), settings, served)
        declare_rate_limit_headers(built)
        if loaded is not None:
            app.openapi_schema = built
        return built

    app.openapi = openapi  # type: ignore[method-assign]

    metrics_registry = CollectorRegistry()
    http_metrics = HttpMetrics(metrics_registry)
    metrics_registry.register(EngineCollector(state))
    state.ensemble_metrics = EnsembleMetrics(metrics_registry)
    app.state.metrics_registry = metrics_registry  # a replica reports it (server/scale)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(metrics_registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def root(request: Request) -> RedirectResponse:
        """A browser pointed at the server finds the API's reference."""
        return RedirectResponse(f"{request.scope.get('root_path', '')}/docs")

    # On the client's own `receive`, so it can drain a refused body before answering.
    app.add_middleware(BodyLimit, limit_for=partial(body_limit, settings))
    app.add_middleware(RateLimitHeaders)
    # Outside the body limit, so its early 413s are logged and counted too. AccessLog passes
    # `receive` through untouched, so the body limit still reads the client's own bytes.
    app.add_middleware(AccessLog, metrics=http_metrics)
    return app


def body_limit(settings: Settings, method: str, path: str) -> tuple[int, str]:
    if method == "POST" and path == "/v1/prefixes":
        return settings.max_upload_bytes, "upload"
    if method == "POST" and path == "/v1/files":
        return settings.max_training_file_bytes, "training file upload"
    return settings.max_request_bytes, "request body"


def start_services(state: Services, loaded: LoadedModel | None) -> None:
    settings = state.settings
    try:
        if loaded is None:
            loaded = load_model(
                settings.model,
                dtype=settings.dtype,
                device=settings.device,
                attn_implementation=settings.attn_implementation,
                cache_dir=settings.model_cache,
            )
        state.loaded = loaded
        # Opening it logs the prefixes compiled for another model, which it will not serve.
        state.registry = Registry(
            settings.data_dir,
            compiler=loaded.prefix_compiler(settings.max_virtual_tokens),
            database_url=settings.database_url,
            device_pool_bytes=settings.device_pool_bytes,
            host_pool_bytes=settings.host_pool_bytes,
            store_dir=settings.prefix_store,
            file_grace=settings.file_grace_seconds,
        )
        share = settings.max_pinned_share_per_tenant
        state.pins = TenantPins(int(share * settings.device_pool_bytes))
        # Serving and fine-tuning take turns on the device (server/device_share.py).
        device_share = DeviceShare(settings.train_share)
        state.engine = Engine(loaded, settings.engine_config(), device_share=device_share).start()
        state.tuning = Tuning(
            state.registry.database,
            Limits(
                max_files=settings.max_files_per_tenant,
                max_file_bytes=settings.max_file_bytes_per_tenant,
                max_active_jobs=settings.max_jobs_per_tenant,
            ),
        )
        state.ensembles = Ensembles(
            state.registry.database,
            max_members=settings.max_ensemble_members,
            max_per_tenant=settings.max_ensembles_per_tenant,
        )
        checkpoints = Checkpoints(
            state.registry.database,
            CheckpointFiles(settings.prefix_store),  # shared: any replica may resume a job
            keep=settings.checkpoints_per_job,
        )
        state.usage_ledger = UsageLedger(state.registry.database)
        state.usage_flusher = UsageFlusher(
            state.usage_meter, state.usage_ledger, settings.usage_flush_interval
        ).start()
        state.rate_limiter = RateLimiter(
            RateLimits(settings.requests_per_minute, settings.tokens_per_minute),
            share=settings.rate_limit_share,
            read_overrides=state.registry.rate_limit_overrides,
            refresh=settings.rate_limit_refresh,
        ).start()
        state.worker = TuningWorker(
            state.tuning,
            checkpoints,
            state.registry,
            loaded,
            device_share,
            max_running=settings.max_running_jobs,
            max_len=settings.max_len,
            lease_s=settings.job_lease,
            checkpoint_interval=settings.checkpoint_interval,
            meter=state.usage_meter,
        ).start()
        state.ready = True
        log.info("ready: model %s, data in %s", loaded.model_id, settings.data_dir)
    except Exception as exc:
        log.exception("startup failed")
        state.startup_error = f"{type(exc).__name__}: {exc}"


def stop_services(state: Services) -> None:
    """Stop training and admitting, give running requests the grace period, cancel the rest,
    close. A job still training checkpoints and stays `running` in the database, its lease
    released: the next start (or another replica) resumes it."""
    state.ready = False
    if state.worker is not None:
        state.worker.stop(state.settings.shutdown_grace)
    if state.engine is not None:
        if not state.engine.drain(state.settings.shutdown_grace):
            log.warning("shutdown grace period over: cancelling the requests still running")
        state.engine.stop()
    if state.rate_limiter is not None:
        state.rate_limiter.close()
    if state.usage_flusher is not None:
        state.usage_flusher.close()  # after the engine and the worker: their last counts too
    if state.registry is not None:
        state.registry.close()
