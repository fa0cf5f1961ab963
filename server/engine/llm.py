"""Synchronous continuous batching, for scripts, tests and benchmarks.

The same step as the serving engine (`EngineCore`), driven by a plain loop instead of a thread.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from prefixes import CompiledPrefix, RawPrefix
from server.engine.config import EngineConfig
from server.engine.core import EngineCore
from server.engine.request import Request
from server.models import LoadedModel


class LLM:
    def __init__(
        self,
        loaded: LoadedModel,
        config: EngineConfig | None = None,
        *,
        num_slots: int | None = None,
        max_len: int | None = None,
        max_virtual_tokens: int = 256,
    ) -> None:
        self.loaded = loaded
        self.max_virtual_tokens = max_virtual_tokens
        # One caller, no tenants to protect from each other: no per-tenant cap by default.
        config = config or EngineConfig(max_running_per_tenant=0)
        if num_slots is not None:
            config = replace(config, num_slots=num_slots)
        if max_len is not None:
            config = replace(config, max_len=max_len)
        self.core = EngineCore(loaded, config)
        self.runner = self.core.runner
        self.max_len = self.core.max_len

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
