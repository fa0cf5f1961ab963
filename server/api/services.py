"""What the routes use: the loaded model, the registry and the engine, set up by the lifespan."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request

from prefixes.catalog.ensembles import Ensembles
from prefixes.registry import Registry
from prefixes.tuning.tuning import Tuning
from prefixes.usage.flusher import UsageFlusher
from prefixes.usage.ledger import UsageLedger
from prefixes.usage.meter import UsageMeter
from server.api.ensemble_metrics import EnsembleMetrics
from server.api.errors import ApiError
from server.api.pins import TenantPins
from server.api.rate_limits import RateLimiter
from server.config import Settings
from server.engine.engine import Engine
from server.models import LoadedModel
from server.tuning.worker import TuningWorker


@dataclass
class Services:
    settings: Settings
    loaded: LoadedModel | None = None
    registry: Registry | None = None
    engine: Engine | None = None
    pins: TenantPins | None = None
    tuning: Tuning | None = None
    worker: TuningWorker | None = None
    ensembles: Ensembles | None = None
    usage_meter: UsageMeter = field(default_factory=UsageMeter)
    usage_ledger: UsageLedger | None = None
    usage_flusher: UsageFlusher | None = None
    rate_limiter: RateLimiter | None = None
    # Registered with the app's /metrics registry when the app is made (create_app).
    ensemble_metrics: EnsembleMetrics = field(default_factory=EnsembleMetrics)
    startup_error: str | None = None
    ready: bool = field(default=False)

    @property
    def model_id(self) -> str:
        return self.loaded.model_id if self.loaded else "loading"


@dataclass(frozen=True)
class Ready:
    """Services once the server is ready: every field set."""

    settings: Settings
    loaded: LoadedModel
    registry: Registry
    engine: Engine
    pins: TenantPins
    tuning: Tuning
    worker: TuningWorker
    ensembles: Ensembles
    ensemble_metrics: EnsembleMetrics
    usage_meter: UsageMeter
    usage_ledger: UsageLedger
    rate_limiter: RateLimiter


def services(request: Request) -> Services:
    state: Services = request.app.state.services
    return state


def ready(request: Request) -> Ready:
    """Dependency: 503 until the model is loaded and the engine runs."""
    state = services(request)
    if not (
        state.ready
        and state.loaded
        and state.registry
        and state.engine
        and state.pins
        and state.tuning
        and state.worker
        and state.ensembles
        and state.usage_ledger
        and state.rate_limiter
    ):
        message = state.startup_error or "the server is starting: the model is loading"
        raise ApiError(503, "unavailable", message, headers={"Retry-After": "5"})
    return Ready(
        state.settings,
        state.loaded,
        state.registry,
        state.engine,
        state.pins,
        state.tuning,
        state.worker,
        state.ensembles,
        state.ensemble_metrics,
        state.usage_meter,
        state.usage_ledger,
        state.rate_limiter,
    )
