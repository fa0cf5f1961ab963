"""Prometheus export: HTTP request counters, plus the engine's and the prefix pool's figures."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from server.api.services import Services
from server.engine.metrics import Histogram as EngineHistogram


class HttpMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "prefix_server_http_requests",
            "HTTP requests by route, method and status",
            ["route", "method", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "prefix_server_http_request_seconds",
            "HTTP request duration (until the response starts, for streams)",
            ["route"],
            registry=registry,
        )


# (name after prefix_server_, help, EngineMetrics attribute)
ENGINE_COUNTERS = [
    ("prompt_tokens", "prompt tokens admitted", "prompt_tokens"),
    ("generated_tokens", "tokens generated", "generated_tokens"),
    ("engine_steps", "engine steps run", "steps"),
    ("engine_failed_steps", "steps that raised (their rows were then run alone)", "failed_steps"),
    (
        "engine_non_finite_rows",
        "requests failed alone because their own values overflowed to NaN or Inf",
        "non_finite_rows",
    ),
    ("engine_preemptions", "rows preempted when KV blocks ran out (recomputed)", "preemptions"),
]
# (name after prefix_server_pool_, help, PoolStats attribute)
POOL_COUNTERS = [
    ("hits", "acquires served from the device", "hits"),
    ("host_hits", "loads from the host tier", "host_hits"),
    ("misses", "loads from disk", "misses"),
    ("evictions", "device -> host evictions", "evictions"),
    ("load_seconds", "time spent loading prefixes", "load_seconds_total"),
]


class EngineCollector(Collector):
    """Reads the engine's plain counters and the pool's stats at scrape time."""

    def __init__(self, state: Services) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        engine, registry = self.state.engine, self.state.registry
        if engine is None or registry is None:
            return
        m = engine.metrics
        for name, doc, attribute in ENGINE_COUNTERS:
            yield counter(f"prefix_server_{name}", doc, getattr(m, attribute))
        finished = CounterMetricFamily(
            "prefix_server_requests_finished", "requests finished, by reason", labels=["reason"]
        )
        for reason, count in sorted(m.requests_finished.items()):
            finished.add_metric([reason], count)
        yield finished
        yield gauge("prefix_server_running_rows", "rows in the batch", engine.num_running)
        blocks = engine.kv_blocks()
        yield gauge("prefix_server_kv_blocks_total", "KV blocks in the pool", blocks.total)
        yield gauge("prefix_server_kv_blocks_free", "KV blocks free", blocks.free)
        # Totals only: /metrics is read without a key, and tenant names are not public.
        waiting = engine.waiting_per_tenant()
        yield gauge("prefix_server_queue_depth", "waiting requests", sum(waiting.values()))
        yield gauge("prefix_server_waiting_tenants", "tenants with waiting requests", len(waiting))
        yield histogram("prefix_server_time_to_first_token_seconds", "TTFT", m.time_to_first_token)
        yield histogram(
            "prefix_server_inter_token_seconds", "time between tokens", m.inter_token_latency
        )
        yield histogram("prefix_server_step_seconds", "engine step time", m.step_seconds)
        stats = registry.stats()
        resident = GaugeMetricFamily(
            "prefix_server_pool_resident_bytes", "compiled prefix bytes per tier", labels=["tier"]
        )
        resident.add_metric(["device"], stats.device_bytes)
        resident.add_metric(["host"], stats.host_bytes)
        yield resident
        yield gauge(
            "prefix_server_pool_pinned_bytes", "bytes pinned by requests", stats.pinned_bytes
        )
        for name, doc, attribute in POOL_COUNTERS:
            yield counter(f"prefix_server_pool_{name}", doc, getattr(stats, attribute))
        worker = self.state.worker
        if worker is not None:
            yield gauge(
                "prefix_server_fine_tuning_jobs_running", "jobs training now", worker.num_running
            )
            # training_beside_serving / (that + engine) is what --train-share bounds.
            device = CounterMetricFamily(
                "prefix_server_device_seconds",
                "time on the device, in turns, by who had it",
                labels=["user"],
            )
            share = worker.share
            device.add_metric(["engine"], share.engine_seconds)
            device.add_metric(["training"], share.train_seconds)
            device.add_metric(["training_beside_serving"], share.train_seconds_serving)
            yield device


def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def histogram(name: str, doc: str, h: EngineHistogram) -> HistogramMetricFamily:
    cumulative, buckets = 0, []
    for bound, count in zip((*h.buckets, float("inf")), h.counts, strict=True):
        cumulative += count
        buckets.append(("+Inf" if bound == float("inf") else str(bound), cumulative))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=h.total)
