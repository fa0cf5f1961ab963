"""`prefix-server serve --replicas N`: the Ray Serve application on a local Ray, or on the
cluster that RAY_ADDRESS names, until SIGINT or SIGTERM."""

from __future__ import annotations

import logging
import os
import signal
import threading

from server.config import Settings

log = logging.getLogger("prefix_server")

APP_NAME = "prefix-server"


def run_replicas(settings: Settings) -> int:
    # Ray reports usage statistics unless told not to; a server reaches out to nothing by
    # itself (RAY_USAGE_STATS_ENABLED=1 allows it).
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from server.scale.deployments import build_app

    if settings.model is None:
        # Convert the embedded model here, once: replicas converting it together into one
        # data directory would replace each other's copy.
        from server.models import ensure_embedded_model

        ensure_embedded_model(settings.model_cache)
    address = os.environ.get("RAY_ADDRESS")
    # A local Ray gets no dashboard: the server's own /metrics and logs are what it reports.
    ray.init(address=address or None, include_dashboard=False if not address else None)
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(build_app(settings), name=APP_NAME, route_prefix="/", blocking=False)
        log.info(
            "ready: %s replicas on http://%s:%d (Ray %s)",
            settings.replicas,
            settings.host,
            settings.port,
            address or "local",
        )
        stopping.wait()
    finally:
        log.info("stopping: replicas finish their requests (--shutdown-grace)")
        serve.shutdown()
        ray.shutdown()
    return 0
