"""Synchronous continuous batching, for scripts, tests and benchmarks.

The same step as the serving engine (`EngineCore`), driven by a plain loop instead of a thread.
"""

from __future__ import annotations

from collections.abc import Iterable

from prefixes import CompiledPrefix, RawPrefix
from server.engine.core import EngineCore
from server.engine.request import Request
from server.engine.scheduler import SchedulerConfig
from server.models import LoadedModel


class LLM:
    def __init__(
        self,
        loaded: LoadedModel,
        *,
        num_slots: int = 16,
        max_len: int = 2048,
        max_virtual_tokens: int = 256,
    ) -> None:
        self.loaded = loaded
        self.max_virtual_tokens = max_virtual_tokens
        # One caller, no tenants to protect from each other: no queue bound, no per-tenant cap.
        config = SchedulerConfig(num_slots=num_slots, max_waiting=1 << 30, max_running_per_tenant=0)
        self.core = EngineCore(loaded, config, max_len=max_len)
        self.runner = self.core.runner
        self.max_len = self.core.max_len

    @property
    def free_slots(self) -> list[int]:
        return list(self.core.free_slots)

    @property
    def running(self) -> list[Request]:
        return self.core.running

    @property
    def has_work(self) -> bool:
        return self.core.has_work

    def compile(self, raw: RawPrefix) -> CompiledPrefix:
        return self.loaded.compile(raw, self.max_virtual_tokens)

    def add(self, request: Request) -> None:
        self.core.add(request)

    def step(self) -> list[Request]:
        """Run one step; return the requests that finished in it."""
        return [out.request for out in self.core.step() if out.finished]

    def generate(self, requests: Iterable[Request]) -> list[Request]:
        requests = list(requests)
        for request in requests:
            self.add(request)
        while self.has_work:
            self.step()
        return requests
