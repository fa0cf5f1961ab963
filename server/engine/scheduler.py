"""Admission: which waiting requests join the batch this step. Pure Python, no tensors.

Policy, in order:
- Tenants take turns (round-robin over tenants with waiting requests, one request per turn),
  so a tenant flooding the queue delays another tenant by at most one request per busy tenant.
- A tenant holds at most `max_running_per_tenant` rows, so it cannot occupy every slot.
- Prompt tokens admitted in one step are capped by `max_prefill_tokens`: the prefill of
  newcomers runs in the same forward as the decode of running rows, and a cap keeps that
  forward, and so every running row's next token, from stalling behind a burst of long prompts.
  The first newcomer of a step is always admitted, so a long prompt is never starved.
- The distinct prefixes of running rows stay within `max_prefix_bytes`.
- The waiting queue is bounded: beyond `max_waiting`, `add` raises Overloaded at once; so is
  each tenant's share of it (`max_waiting_per_tenant`), so one tenant's flood gets that tenant
  429 and leaves room in the queue for everyone else.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass

from server.engine.request import Request


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    num_slots: int = 16
    max_waiting: int = 256
    max_waiting_per_tenant: int = 1 << 30
    max_prefill_tokens: int = 512
    max_running_per_tenant: int = 8  # 0: no cap
    max_prefix_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        names = ("num_slots", "max_waiting", "max_waiting_per_tenant", "max_prefill_tokens",
                 "max_prefix_bytes")  # fmt: skip
        for name in names:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, found {getattr(self, name)}")
        if self.max_running_per_tenant < 0:
            raise ValueError(
                f"max_running_per_tenant: expected >= 0, found {self.max_running_per_tenant}"
            )


class Overloaded(Exception):
    """The waiting queue is full; try again after `retry_after` seconds."""

    def __init__(self, retry_after: float, waiting: int, tenant: str | None = None) -> None:
        whose = f"tenant {tenant!r} has" if tenant else "the server has"
        super().__init__(
            f"overloaded: {whose} {waiting} requests waiting; retry in {retry_after:.0f} s"
        )
        self.retry_after = retry_after


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.queues: dict[str, deque[Request]] = {}
        self.turns: deque[str] = deque()  # tenants with waiting requests, next turn first
        self.running_per_tenant: Counter[str] = Counter()
        self.num_waiting = 0
        self.finish_rate = 1.0  # requests finished per second, smoothed; for retry hints

    def add(self, request: Request) -> None:
        if self.num_waiting >= self.config.max_waiting:
            raise Overloaded(self._retry_after(self.num_waiting), self.num_waiting)
        queued = len(self.queues.get(request.tenant, ()))
        if queued >= self.config.max_waiting_per_tenant:
            raise Overloaded(self._retry_after(queued), queued, request.tenant)
        queue = self.queues.setdefault(request.tenant, deque())
        if not queue:
            self.turns.append(request.tenant)
        queue.append(request)
        self.num_waiting += 1

    def remove_waiting(self, request: Request) -> bool:
        queue = self.queues.get(request.tenant)
        if not queue or request not in queue:
            return False
        queue.remove(request)
        self.num_waiting -= 1
        if not queue:
            self._drop_tenant(request.tenant)
        return True

    def admit(self, free_slots: int, running: list[Request]) -> list[Request]:
        """Pop the requests that join the batch now, in fair order, within every budget."""
        cap = self.config.max_running_per_tenant
        prefill_budget = self.config.max_prefill_tokens
        # Keyed by the KV tensor: every request pinning one prefix version gets its own
        # CompiledPrefix, but all of them share the pool's one tensor.
        prefixes = {id(r.prefix.kv): r.prefix.nbytes for r in running if r.prefix is not None}
        prefix_bytes = sum(prefixes.values())
        admitted: list[Request] = []
        passes_without_admission = 0
        while free_slots and self.turns and passes_without_admission < len(self.turns):
            tenant = self.turns[0]
            self.turns.rotate(-1)
            request = self.queues[tenant][0]
            new_prefix = request.prefix is not None and id(request.prefix.kv) not in prefixes
            extra_bytes = request.prefix.nbytes if new_prefix and request.prefix else 0
            blocked = (
                (cap and self.running_per_tenant[tenant] >= cap)
                or (admitted and len(request.pending_token_ids) > prefill_budget)
                or (prefixes and prefix_bytes + extra_bytes > self.config.max_prefix_bytes)
            )
            if blocked:
                passes_without_admission += 1
                continue
            passes_without_admission = 0
            self.queues[tenant].popleft()
            self.num_waiting -= 1
            if not self.queues[tenant]:
                self._drop_tenant(tenant)
            self.running_per_tenant[tenant] += 1
            prefill_budget -= len(request.pending_token_ids)
            if new_prefix and request.prefix is not None:
                prefixes[id(request.prefix.kv)] = extra_bytes
                prefix_bytes += extra_bytes
            admitted.append(request)
            free_slots -= 1
        return admitted

    def finished(self, request: Request) -> None:
        self.running_per_tenant[request.tenant] -= 1
        if self.running_per_tenant[request.tenant] <= 0:
            del self.running_per_tenant[request.tenant]

    def _retry_after(self, waiting: int) -> float:
        return min(60.0, max(1.0, math.ceil(waiting / self.finish_rate)))

    def note_finish_rate(self, per_second: float) -> None:
        self.finish_rate = 0.9 * self.finish_rate + 0.1 * max(per_second, 0.01)

    def waiting_per_tenant(self) -> dict[str, int]:
        return {tenant: len(queue) for tenant, queue in self.queues.items() if queue}

    def _drop_tenant(self, tenant: str) -> None:
        del self.queues[tenant]
        self.turns.remove(tenant)
