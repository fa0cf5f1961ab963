"""Per-tenant budget of pinned prefix bytes: one tenant's in-flight requests cannot fill the pool.

Every request, waiting or running, pins its prefix version on the device until it leaves the
engine. Without a budget, one tenant queueing requests that name many large prefixes would pin
the whole device pool, and every other tenant's next prefix would get 429 PoolExhausted. With it,
that tenant gets 429 and nobody else does. The budget is checked between resolving a version and
pinning it, so a refused version is never loaded and evicts nothing. A version held by several of
the tenant's requests counts once, and a tenant that holds nothing may always hold one prefix,
however large.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence

from prefixes.catalog.records import PrefixInfo
from server.api.errors import ApiError


class TenantPins:
    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._lock = threading.Lock()  # hold runs on worker threads, forget on the engine's
        self._held: dict[str, Counter[str]] = {}  # tenant -> sha256 -> requests holding it
        self._bytes: Counter[str] = Counter()  # tenant -> distinct held bytes

    def hold(self, tenant: str, info: PrefixInfo, alongside: Sequence[PrefixInfo] = ()) -> None:
        """Count a version against its tenant before it is pinned, or raise 429 for this tenant
        alone. Every hold is undone by exactly one `forget` of the same version. `alongside`:
        what the same request holds already (an ensemble's earlier members)."""
        with self._lock:
            held = self._held.setdefault(tenant, Counter())
            new_bytes = 0 if info.sha256 in held else info.bytes
            pinned = self._bytes[tenant]
            # One request of a tenant that holds nothing else always runs, an ensemble's
            # members together included: a 429 for it could never clear, however long the
            # tenant waited (the budget bounds the rest of what it may hold).
            others = held - Counter(i.sha256 for i in alongside)
            if others and new_bytes and pinned + new_bytes > self.budget_bytes:
                raise ApiError(
                    429,
                    "overloaded",
                    f"overloaded: tenant {tenant!r}'s requests in flight pin {pinned} bytes of "
                    f"prefixes; this one needs {new_bytes} more, the limit is "
                    f"{self.budget_bytes}",
                    headers={"Retry-After": "1"},
                )
            held[info.sha256] += 1
            self._bytes[tenant] += new_bytes

    def forget(self, tenant: str, info: PrefixInfo) -> None:
        with self._lock:
            held = self._held[tenant]
            held[info.sha256] -= 1
            if held[info.sha256] == 0:
                del held[info.sha256]
                self._bytes[tenant] -= info.bytes
            if not held:
                del self._held[tenant]
                del self._bytes[tenant]
