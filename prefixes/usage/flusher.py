"""The one writer of usage: a background thread that takes what the meter gathered every
`interval` seconds and adds it to the database in one transaction, and once more at close.

What a kill -9 can lose: what was gathered since the last flush, at most `interval` seconds of
counts (and, on a database failure, what the retries kept in memory). A batch is never written
twice: it is taken from the meter before its transaction and given back only if the
transaction failed (a commit is all or nothing).
"""

from __future__ import annotations

import logging
import threading

from prefixes.usage.ledger import UsageLedger
from prefixes.usage.meter import UsageMeter

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 2.0


class UsageFlusher:
    def __init__(
        self, meter: UsageMeter, ledger: UsageLedger, interval: float = DEFAULT_INTERVAL
    ) -> None:
        self.meter = meter
        self.ledger = ledger
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="usage-flusher", daemon=True)

    def start(self) -> UsageFlusher:
        self._thread.start()
        return self

    def flush(self) -> bool:
        """Write what was gathered; False (and the batch kept for the next try) on failure."""
        batch = self.meter.take()
        if not batch:
            return True
        try:
            self.ledger.add(batch)
        except Exception:
            log.exception(
                "usage: writing %d rows failed; keeping them for the next flush", len(batch)
            )
            self.meter.give_back(batch)
            return False
        return True

    def close(self) -> None:
        """Stop the thread and write what is left."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.flush()
