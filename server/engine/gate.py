"""Back-pressure at the door: the bounded queue, counted on the callers' side.

`submit` must answer 429 at once, without waiting for the engine thread to read its inbox, so the
only engine state callers touch is this gate: counters under a lock of their own. The engine
thread tells it when a request leaves the queue (admitted or cancelled) and when it is done.
"""

from __future__ import annotations

import math
import threading
from collections import Counter


class Overloaded(Exception):
    """The waiting queue is full; try again after `retry_after` seconds."""

    def __init__(self, retry_after: float, waiting: int, tenant: str | None = None) -> None:
        whose = f"tenant {tenant!r} has" if tenant else "the server has"
        super().__init__(
            f"overloaded: {whose} {waiting} requests waiting; retry in {retry_after:.0f} s"
        )
        self.retry_after = retry_after


class AdmissionGate:
    def __init__(self, max_waiting: int, max_waiting_per_tenant: int) -> None:
        self.max_waiting = max_waiting
        self.max_waiting_per_tenant = max_waiting_per_tenant
        self._lock = threading.Lock()
        self._waiting: Counter[str] = Counter()
        self._queued: set[str] = set()  # request ids still waiting for their first admission
        self._in_flight = 0  # entered and not yet done
        self.finish_rate = 1.0  # requests finished per second, smoothed; for retry hints

    def enter(self, request_id: str, tenant: str) -> None:
        """Count a new request in, or raise Overloaded."""
        with self._lock:
            total = len(self._queued)
            if total >= self.max_waiting:
                raise Overloaded(self._retry_after(total), total)
            queued = self._waiting[tenant]
            if queued >= self.max_waiting_per_tenant:
                raise Overloaded(self._retry_after(queued), queued, tenant)
            self._waiting[tenant] += 1
            self._queued.add(request_id)
            self._in_flight += 1

    def dequeued(self, request_id: str, tenant: str) -> None:
        """It left the queue (admitted, or cancelled while waiting); idempotent."""
        with self._lock:
            if request_id in self._queued:
                self._queued.discard(request_id)
                self._waiting[tenant] -= 1
                if self._waiting[tenant] <= 0:
                    del self._waiting[tenant]

    def done(self, request_id: str, tenant: str) -> None:
        self.dequeued(request_id, tenant)
        with self._lock:
            self._in_flight -= 1

    @property
    def tenant_queue_limit(self) -> int:
        """The most requests one tenant can ever have waiting: rows that must enter together
        beyond it would be refused with 429 on every try."""
        return min(self.max_waiting, self.max_waiting_per_tenant)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def waiting_per_tenant(self) -> dict[str, int]:
        with self._lock:
            return dict(self._waiting)

    def note_finish_rate(self, per_second: float) -> None:
        self.finish_rate = 0.9 * self.finish_rate + 0.1 * max(per_second, 0.01)

    def _retry_after(self, waiting: int) -> float:
        return min(60.0, max(1.0, math.ceil(waiting / self.finish_rate)))
