"""Usage gathered in memory, on the threads where the work happens (the engine's, the tuning
worker's, the event loop's for refusals): one dict update under a lock, never a database call.
The flusher takes what accumulated and writes it (flusher.py)."""

from __future__ import annotations

import threading
import time

from prefixes.usage.records import Counts, UsageKey, hour_of


class UsageMeter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[UsageKey, Counts] = {}

    def add(self, tenant: str, model: str, counts: Counts, when: float | None = None) -> None:
        key = UsageKey(tenant, model, hour_of(time.time() if when is None else when))
        with self._lock:
            pending = self._pending.get(key)
            if pending is None:
                self._pending[key] = counts
            else:
                pending.add(counts)

    def take(self) -> dict[UsageKey, Counts]:
        """Everything gathered since the last take; the meter starts afresh."""
        with self._lock:
            taken, self._pending = self._pending, {}
        return taken

    def give_back(self, taken: dict[UsageKey, Counts]) -> None:
        """Put back a batch that could not be written, so the next flush tries again."""
        for key, counts in taken.items():
            with self._lock:
                pending = self._pending.get(key)
                if pending is None:
                    self._pending[key] = counts
                else:
                    pending.add(counts)

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)
