"""Every replica's Prometheus metrics in one scrape, each sample labelled with its replica.

Each replica reports the text of its own /metrics every few seconds; GET /metrics on the
application renders what the replicas reported, so one scrape target shows them all. A replica
that stops reporting (it died, or was scaled down) drops out after `stale_after` seconds.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

REPLICA_LABEL = "replica"


def merge(texts: Mapping[str, str]) -> bytes:
    """One exposition from several, each sample labelled `replica="<id>"`."""
    families: dict[str, Metric] = {}
    for replica, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(
                family.name, Metric(family.name, family.documentation, family.type, family.unit)
            )
            for sample in family.samples:
                labels = {**sample.labels, REPLICA_LABEL: replica}
                merged.samples.append(sample._replace(labels=labels))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(list(families.values())))
    return generate_latest(registry)


class _Fixed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families


class Board:
    """The latest report of each replica."""

    def __init__(self, stale_after: float) -> None:
        self._stale_after = stale_after
        self._reports: dict[str, tuple[float, str]] = {}

    def report(self, replica: str, text: str) -> None:
        self._reports[replica] = (time.monotonic(), text)

    def render(self) -> bytes:
        horizon = time.monotonic() - self._stale_after
        self._reports = {r: (t, text) for r, (t, text) in self._reports.items() if t >= horizon}
        return merge({replica: text for replica, (_, text) in self._reports.items()})
