"""Synchronous continuous batching over the runner, for scripts, tests and benchmarks.

Requests wait in FIFO order, take a free slot (their prefix is copied in), then run in every
step until they finish, when the slot returns to the free list. Rows in prefill and decode
share steps. The serving engine adds a thread, async streams and fair scheduling on top.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from prefixes import CompiledPrefix, RawPrefix
from server.engine.request import Request
from server.engine.runner import ModelRunner
from server.engine.stopping import append_token
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
        self.max_len = min(max_len, loaded.spec.max_positions)
        self.runner = ModelRunner(loaded.model, loaded.spec, num_slots, self.max_len)
        self.free_slots: deque[int] = deque(range(num_slots))
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.eos_token_ids = loaded.eos_token_ids

    def compile(self, raw: RawPrefix) -> CompiledPrefix:
        return self.loaded.compile(raw, self.max_virtual_tokens)

    def add(self, request: Request) -> None:
        used = request.prefix_len + len(request.prompt_token_ids)
        if used >= self.max_len:
            raise ValueError(
                f"prompt: expected prefix + prompt tokens < {self.max_len}, found {used}"
            )
        vocab = self.loaded.spec.vocab_size
        if any(not 0 <= t < vocab for t in request.prompt_token_ids):
            raise ValueError(f"prompt: expected token ids in [0, {vocab}), found one outside")
        self.waiting.append(request)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> list[Request]:
        """Admit what fits, run one forward over all running rows; return the finished requests."""
        while self.waiting and self.free_slots:
            request = self.waiting.popleft()
            request.slot = self.free_slots.popleft()
            self.runner.load_prefix(request.slot, request.prefix)
            self.running.append(request)
        if not self.running:
            return []
        next_ids = self.runner.step(self.running)
        for request, token in zip(self.running, next_ids, strict=True):
            append_token(
                request,
                token,
                eos_token_ids=self.eos_token_ids,
                max_len=self.max_len,
                tokenizer=self.loaded.tokenizer,
            )
        finished = [r for r in self.running if r.finished]
        self.running = [r for r in self.running if not r.finished]
        self.free_slots.extend(r.slot for r in finished)
        return finished

    def generate(self, requests: Iterable[Request]) -> list[Request]:
        requests = list(requests)
        for request in requests:
            self.add(request)
        while self.has_work:
            self.step()
        return requests
