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


class EngineCollector(Collector):
    """Reads the engine's plain counters and the pool's stats at scrape time."""

    def __init__(self, state: Services) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        engine, registry = self.state.engine, self.state.registry
        if engine is None or registry is None:
            return
        m = engine.metrics
        yield counter("prefix_server_prompt_tokens", "prompt tokens admitted", m.prompt_tokens)
        yield counter("prefix_server_generated_tokens", "tokens generated", m.generated_tokens)
        yield counter("prefix_server_engine_steps", "engine steps run", m.steps)
        yield counter("prefix_server_engine_failed_steps", "steps that raised", m.failed_steps)
        yield counter(
            "prefix_server_engine_non_finite_rows",
            "requests failed alone because their own values overflowed to NaN or Inf",
            m.non_finite_rows,
        )
        finished = CounterMetricFamily(
            "prefix_server_requests_finished", "requests finished, by reason", labels=["reason"]
        )
        for reason, count in sorted(m.requests_finished.items()):
            finished.add_metric([reason], count)
        yield finished
        yield gauge("prefix_server_running_rows", "rows in the batch", engine.num_running)
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
        yield counter("prefix_server_pool_hits", "acquires served from the device", stats.hits)
        yield counter("prefix_server_pool_host_hits", "loads from the host tier", stats.host_hits)
        yield counter("prefix_server_pool_misses", "loads from disk", stats.misses)
        yield counter("prefix_server_pool_evictions", "device -> host evictions", stats.evictions)
        yield counter(
            "prefix_server_pool_load_seconds",
            "time spent loading prefixes",
            stats.load_seconds_total,
        )


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
