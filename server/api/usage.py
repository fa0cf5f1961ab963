"""A call's usage, counted where the work happens: each engine row as it leaves the engine (on
the engine thread: one dict update, no database), refusals where they are decided. The
counts go to the meter, which the flusher writes in batches (prefixes/usage).

What a row counts is what the responses report: a prompt once per prompt (the group's leader
counts it), every row's generated tokens except the followers of a `mean` ensemble (they carry
the leader's tokens, which the answer reports once), the prefix's virtual tokens as the native
`usage.prefix_tokens` (n choices share one prefix: their leader counts it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from prefixes.usage.meter import UsageMeter
from prefixes.usage.records import Counts, Failure
from server.api.rate_limits import RateLimiter
from server.engine.request import Request


def row_counts(request: Request) -> Counts:
    group = request.group
    leader = group is None or group.leader is request
    counts = Counts(
        rows=1,
        prompt_tokens=len(request.prompt_token_ids) if leader else 0,
        completion_tokens=(
            len(request.output_token_ids) if leader or not group.lockstep else 0  # type: ignore[union-attr]
        ),
        virtual_tokens=(
            request.prefix_len if leader or not group.shares_prompt else 0  # type: ignore[union-attr]
        ),
    )
    if request.finish_reason == "error":
        counts.failed_error = 1
    elif request.finish_reason == "cancelled":
        counts.cancelled = 1
    return counts


class CallUsage:
    """One HTTP call on the engine: `on_finish` is every row's hook; `started(rows)` says how
    many rows it has once they are all queued. The first row to leave counts the call as a
    request; the last settles its token reservation with what the call used."""

    def __init__(
        self,
        meter: UsageMeter,
        limiter: RateLimiter,
        tenant: str,
        models: tuple[str, ...],
        reserved: int,
    ) -> None:
        """`models`: what each row counts under, by its place in its group (an unnamed
        ensemble's members); one entry for everything else."""
        self.meter = meter
        self.limiter = limiter
        self.tenant = tenant
        self.models = models
        self.reserved = reserved
        self._lock = threading.Lock()
        self._rows: int | None = None  # known once every row is queued
        self._finished = 0
        self._used = 0
        self._settled = False

    def model_of(self, request: Request) -> str:
        if len(self.models) == 1 or request.group is None:
            return self.models[0]
        return self.models[request.group.members.index(request)]

    def on_finish(self, request: Request) -> None:
        self._count(request, self.model_of(request))

    def on_finish_as(self, model: str) -> Callable[[Request], None]:
        """The hook of a row that counts under `model` whatever its group (a transferability
        scoring's rows: each runs one candidate, or the base model, alone); the call's one
        request counts under the first of `models` (the base model), whichever row ends first."""
        return lambda request: self._count(request, model, request_model=self.models[0])

    def _count(self, request: Request, model: str, request_model: str | None = None) -> None:
        counts = row_counts(request)
        with self._lock:
            first = self._finished == 0
            self._finished += 1
            self._used += counts.prompt_tokens + counts.completion_tokens
        if first and request_model not in (None, model):
            self.meter.add(self.tenant, request_model, Counts(requests=1))
        else:
            counts.requests = int(first)
        self.meter.add(self.tenant, model, counts)
        self._settle_if_done()

    def started(self, rows: int) -> None:
        with self._lock:
            self._rows = rows
        self._settle_if_done()

    def refused(self, failure: Failure) -> None:
        """The call was refused before its rows were all queued; those that were are cancelled
        and still count when they leave. A call naming no valid model is not counted."""
        if not self.models[0]:
            return
        self.meter.add(self.tenant, self.models[0], Counts(**{failure.value: 1}))

    def _settle_if_done(self) -> None:
        with self._lock:
            done = self._rows is not None and self._finished >= self._rows and not self._settled
            if done:
                self._settled = True
                used = self._used
        if done:
            self.limiter.settle(self.tenant, self.reserved, used)
