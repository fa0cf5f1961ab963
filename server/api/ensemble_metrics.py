"""Prometheus figures of prompt ensembles, labelled by method only: ensemble names are tenants'
names, which /metrics never shows, and a label per ensemble would grow without bound."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram


class EnsembleMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.requests = Counter(
            "prefix_server_ensemble_requests",
            "prompt ensembles run (one per prompt), by method",
            ["method"],
            registry=registry,
        )
        self.members = Histogram(
            "prefix_server_ensemble_members",
            "members (rows) per prompt ensemble, by method",
            ["method"],
            buckets=(2, 3, 4, 6, 8, 12, 16, 32, 64),
            registry=registry,
        )
        self.vote_agreement = Histogram(
            "prefix_server_ensemble_vote_agreement",
            "share of a vote's members that gave the winning text",
            buckets=(0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0),
            registry=registry,
        )

    def started(self, method: str, members: int, prompts: int) -> None:
        """One ensemble per prompt, each of `members` rows."""
        self.requests.labels(method).inc(prompts)
        histogram = self.members.labels(method)
        for _ in range(prompts):
            histogram.observe(members)
