"""Per-tenant budget of pinned prefix bytes: one tenant's in-flight requests cannot fill the pool.

Every request, waiting or running, pins its prefix version on the device until it leaves the
engine. Without a budget, one tenant queueing requests that name many large prefixes would pin
the whole device pool, and every other tenant's next prefix would get 429 PoolExhausted. With it,
that tenant gets 429 and nobody else does. A version pinned by several of the tenant's requests
counts once, and a tenant that pins nothing may always pin one prefix, however large.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

from prefixes.serving import PrefixHandle
from server.api.errors import ApiError


class TenantPins:
    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._lock = threading.Lock()  # admit runs on the event loop, release on the engine's
        self._pins: dict[str, Counter[str]] = {}  # tenant -> sha256 -> requests holding it
        self._bytes: Counter[str] = Counter()  # tenant -> distinct pinned bytes

    def admit(self, tenant: str, handle: PrefixHandle) -> Callable[[], None]:
        """Count a pinned handle against its tenant; return the release to hand to the engine.
        Over budget: release the handle and raise 429 for this tenant alone."""
        sha, size = handle.info.sha256, handle.prefix.nbytes
        with self._lock:
            held = self._pins.setdefault(tenant, Counter())
            new_bytes = 0 if sha in held else size
            pinned = self._bytes[tenant]
            refused = bool(held) and new_bytes > 0 and pinned + new_bytes > self.budget_bytes
            if not refused:
                held[sha] += 1
                self._bytes[tenant] += new_bytes
        if refused:
            handle.release()
            raise ApiError(
                429,
                "overloaded",
                f"overloaded: tenant {tenant!r}'s requests in flight pin {pinned} bytes of "
                f"prefixes; this one needs {new_bytes} more, the limit is {self.budget_bytes}",
                headers={"Retry-After": "1"},
            )

        def release() -> None:
            handle.release()
            self._forget(tenant, sha, size)

        return release

    def pinned_bytes(self, tenant: str) -> int:
        with self._lock:
            return self._bytes[tenant]

    def _forget(self, tenant: str, sha: str, size: int) -> None:
        with self._lock:
            held = self._pins[tenant]
            held[sha] -= 1
            if held[sha] == 0:
                del held[sha]
                self._bytes[tenant] -= size
            if not held:
                del self._pins[tenant]
                del self._bytes[tenant]
