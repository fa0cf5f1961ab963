"""Per-tenant rate limits: requests and tokens per minute, held in memory (docs/api.md).

Each limit is a window that drains continuously: what a tenant used falls by `limit / 60` a
second, so a tenant that used its whole minute may send again as soon as enough of it has
drained, never a burst of twice the limit at a minute's turn. Tokens are reserved at admission
(prompt + requested max tokens) and the reservation settled with what ran when the call ends.

Admission reads only memory: the tenants' own limits are read from the database all at once, at
start and every `refresh` seconds on a background thread (a PATCH on this replica applies at
once), never per request. With replicas, each enforces `1 / share` of every limit, so together
they never allow more than the limit (docs/reliability.md).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prefixes.catalog.records import RateLimits

log = logging.getLogger(__name__)

MINUTE = 60.0


@dataclass(slots=True)
class Window:
    """What was used of one limit, draining at `limit` per minute."""

    used: float = 0.0
    updated: float = field(default_factory=time.monotonic)

    def drain(self, limit: int, now: float) -> None:
        if now > self.updated:
            self.used = max(0.0, self.used - (now - self.updated) * limit / MINUTE)
            self.updated = now

    def wait_for(self, amount: float, limit: int) -> float:
        """Seconds until `amount` more fits under `limit` (0: it fits now)."""
        over = self.used + amount - limit
        return 0.0 if over <= 0 else over * MINUTE / limit

    def reset(self, limit: int) -> float:
        """Seconds until the window is empty again (OpenAI's x-ratelimit-reset-*)."""
        return 0.0 if limit == 0 else self.used * MINUTE / limit


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One tenant's figures after an admission: what the response headers say."""

    request_limit: int
    requests_left: int
    requests_reset: float
    token_limit: int
    tokens_left: int
    tokens_reset: float

    def headers(self) -> dict[str, str]:
        return {
            "x-ratelimit-limit-requests": str(self.request_limit),
            "x-ratelimit-remaining-requests": str(self.requests_left),
            "x-ratelimit-reset-requests": duration(self.requests_reset),
            "x-ratelimit-limit-tokens": str(self.token_limit),
            "x-ratelimit-remaining-tokens": str(self.tokens_left),
            "x-ratelimit-reset-tokens": duration(self.tokens_reset),
        }


class RateLimited(Exception):
    """Over a limit: `retry_after` seconds until the same request fits."""

    def __init__(self, message: str, retry_after: float, snapshot: Snapshot) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.snapshot = snapshot


class TooLarge(Exception):
    """A call that reserves more tokens than the tenant's whole limit: it can never run."""


@dataclass(slots=True)
class _Tenant:
    requests: Window = field(default_factory=Window)
    tokens: Window = field(default_factory=Window)


class RateLimiter:
    def __init__(
        self,
        defaults: RateLimits,
        *,
        share: int = 1,
        read_overrides: Callable[[], dict[str, RateLimits]] | None = None,
        refresh: float = 5.0,
    ) -> None:
        self.defaults = defaults
        self.share = share
        self._read_overrides = read_overrides
        self._refresh = refresh
        self._lock = threading.Lock()  # the event loop admits; the engine thread settles
        # seconds, monotonic; windows started before a replacement drain from the real clock,
        # so a replacement may only run ahead of it (tests move it on instead of waiting)
        self.clock: Callable[[], float] = time.monotonic
        self._tenants: dict[str, _Tenant] = {}
        self._overrides: dict[str, RateLimits] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rate-limits", daemon=True)

    def start(self) -> RateLimiter:
        self.reload()
        if self._read_overrides is not None:
            self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def reload(self) -> None:
        if self._read_overrides is not None:
            overrides = self._read_overrides()
            with self._lock:
                self._overrides = overrides

    def override(self, tenant: str, limits: RateLimits) -> None:
        """A tenant's own limits changed here: they apply from its next request."""
        with self._lock:
            self._overrides[tenant] = limits

    def limits(self, tenant: str) -> tuple[int, int]:
        """The tenant's (requests, tokens) per minute on this replica."""
        with self._lock:
            return self._limits(tenant)

    def admit_request(self, tenant: str) -> Snapshot:
        """Count one request, or raise RateLimited with nothing counted."""
        with self._lock:
            state, (requests, tokens) = self._state(tenant)
            wait = state.requests.wait_for(1, requests) if requests else math.inf
            if wait > 0:
                snapshot = self._snapshot(state, requests, tokens)
                raise RateLimited(
                    f"rate limited: tenant {tenant!r} may send {requests} requests per minute"
                    + ("" if requests else " (none: its limit is 0)"),
                    wait,
                    snapshot,
                )
            state.requests.used += 1
            return self._snapshot(state, requests, tokens)

    def reserve_tokens(self, tenant: str, amount: int) -> Snapshot:
        """Reserve `amount` tokens, or raise RateLimited (TooLarge beyond the whole limit)."""
        with self._lock:
            state, (requests, tokens) = self._state(tenant)
            if amount > tokens:
                raise TooLarge(
                    f"this call reserves {amount} tokens (prompt + max tokens for each row), "
                    f"more than tenant {tenant!r}'s {tokens} tokens per minute: ask for fewer "
                    "max tokens or fewer rows"
                )
            wait = state.tokens.wait_for(amount, tokens)
            if wait > 0:
                snapshot = self._snapshot(state, requests, tokens)
                raise RateLimited(
                    f"rate limited: tenant {tenant!r} may use {tokens} tokens per minute; "
                    f"this call reserves {amount}, {snapshot.tokens_left} are left",
                    wait,
                    snapshot,
                )
            state.tokens.used += amount
            return self._snapshot(state, requests, tokens)

    def settle(self, tenant: str, reserved: int, used: int) -> None:
        """A call ended: its reservation is replaced by what it used."""
        with self._lock:
            state, _ = self._state(tenant)
            state.tokens.used = max(0.0, state.tokens.used + used - reserved)

    def _limits(self, tenant: str) -> tuple[int, int]:
        own = self._overrides.get(tenant, RateLimits())
        requests = first_set(own.requests_per_minute, self.defaults.requests_per_minute)
        tokens = first_set(own.tokens_per_minute, self.defaults.tokens_per_minute)
        return requests // self.share, tokens // self.share

    def _state(self, tenant: str) -> tuple[_Tenant, tuple[int, int]]:
        now = self.clock()
        limits = self._limits(tenant)
        state = self._tenants.get(tenant)
        if state is None:
            state = self._tenants[tenant] = _Tenant()
        state.requests.drain(limits[0], now)
        state.tokens.drain(limits[1], now)
        return state, limits

    @staticmethod
    def _snapshot(state: _Tenant, requests: int, tokens: int) -> Snapshot:
        return Snapshot(
            requests,
            max(0, math.floor(requests - state.requests.used)),
            state.requests.reset(requests),
            tokens,
            max(0, math.floor(tokens - state.tokens.used)),
            state.tokens.reset(tokens),
        )

    def _run(self) -> None:
        while not self._stop.wait(self._refresh):
            try:
                self.reload()
            except Exception:  # a database hiccup: keep the limits known, try again
                log.exception("rate limits: reading the tenants' own limits failed")


def first_set(own: int | None, default: int | None) -> int:
    value = own if own is not None else default
    assert value is not None, "the server's defaults are always set"
    return value


def duration(seconds: float) -> str:
    """OpenAI's reset format, a Go duration: "0s", "250ms", "6s", "1m30s"."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text
