"""Plain counters and histograms the engine updates; exporters (Prometheus) read them.

Updated on the engine thread only; readers may see a value one step old, never a torn one
(each field is one Python object replaced or incremented under the GIL).
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class Histogram:
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)  # one per bucket, plus +Inf
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1


@dataclass
class EngineMetrics:
    steps: int = 0
    failed_steps: int = 0
    preemptions: int = 0  # rows whose blocks were taken back, to be recomputed
    non_finite_rows: int = 0  # rows failed alone because their own values overflowed
    prompt_tokens: int = 0
    prefill_tokens: int = 0  # prompt tokens fed to the model (a recompute feeds them again)
    generated_tokens: int = 0
    requests_finished: Counter[str] = field(default_factory=Counter)  # by finish reason
    time_to_first_token: Histogram = field(default_factory=Histogram)
    inter_token_latency: Histogram = field(default_factory=Histogram)
    step_seconds: Histogram = field(default_factory=Histogram)
