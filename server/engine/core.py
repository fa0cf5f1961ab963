"""The engine's step, with no threads: admit, copy prefixes in, run one forward, retire.

`LLM` drives it in a plain loop; `Engine` drives it from its own thread and streams the output.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

from server.engine.metrics import EngineMetrics
from server.engine.request import InvalidRequest, NonFiniteOutput, Request, RequestFailed
from server.engine.runner import ModelRunner
from server.engine.scheduler import Scheduler, SchedulerConfig
from server.engine.stopping import append_token, update_text
from server.models import LoadedModel

log = logging.getLogger(__name__)


NON_FINITE_ERROR = (
    "numerical overflow: the model's output for this request became NaN or infinite at token "
    "{position}; its prefix's values are likely too large for this model"
)


@dataclass(slots=True)
class StepOutput:
    request: Request
    token_ids: list[int]  # new this step
    text: str  # newly released text

    @property
    def finished(self) -> bool:
        return self.request.finished


class EngineCore:
    def __init__(self, loaded: LoadedModel, config: SchedulerConfig, *, max_len: int) -> None:
        self.loaded = loaded
        self.max_len = min(max_len, loaded.spec.max_positions)
        self.runner = ModelRunner(loaded.model, loaded.spec, config.num_slots, self.max_len)
        self.scheduler = Scheduler(config)
        self.free_slots: deque[int] = deque(range(config.num_slots))
        self.running: list[Request] = []
        self.eos_token_ids = loaded.eos_token_ids
        self.metrics = EngineMetrics()

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.scheduler.num_waiting)

    def check(self, request: Request) -> None:
        """Raise InvalidRequest if the request can never run on this model."""
        used = request.prefix_len + len(request.prompt_token_ids)
        if used >= self.max_len:
            raise InvalidRequest(
                f"prompt: expected prefix + prompt tokens < {self.max_len}, found {used}"
            )
        vocab = self.loaded.spec.vocab_size
        bad = [t for t in request.prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequest(f"prompt: expected token ids in [0, {vocab}), found {bad[0]}")

    def add(self, request: Request) -> None:
        self.check(request)
        self.scheduler.add(request)

    def abort(
        self, request: Request, reason: str = "cancelled", error: RequestFailed | None = None
    ) -> bool:
        """Finish a waiting or running request now; False if it had already left."""
        if request in self.running:
            self.running.remove(request)
            self._retire(request, reason, error)
            return True
        if self.scheduler.remove_waiting(request):
            self._release(request, reason, error)
            return True
        return False

    def step(self, admitted: list[Request] | None = None) -> list[StepOutput]:
        """Admit (unless the caller already chose `admitted`), run one forward, retire."""
        if admitted is None:
            admitted = self.scheduler.admit(len(self.free_slots), self.running)
        outputs = [out for out in map(self._admit, admitted) if out is not None]
        if not self.running:
            return outputs
        batch = self.running
        started = time.monotonic()
        try:
            next_ids: list[int | RequestFailed | None] = list(self.runner.step(batch))
        except Exception:  # never the engine, and never the whole batch for one bad row
            log.exception("engine step failed; running its %d rows alone", len(batch))
            self.metrics.failed_steps += 1
            next_ids = self._step_rows_alone(batch)
        now = time.monotonic()
        self.metrics.steps += 1
        self.metrics.step_seconds.observe(now - started)
        for request, token in zip(batch, next_ids, strict=True):
            if isinstance(token, int):
                outputs.append(self._postprocess(request, token, now))
                continue
            if token is None:  # this row's own values overflowed; the others are unaffected
                self.metrics.non_finite_rows += 1
                token = NonFiniteOutput(NON_FINITE_ERROR.format(position=request.num_tokens))
            request.finish_reason, request.error = "error", token  # retired below
            outputs.append(StepOutput(request, [], ""))
        finished = [r for r in batch if r.finished]
        if finished:
            self.running = [r for r in batch if not r.finished]
            for request in finished:
                self._retire(request, request.finish_reason or "stop", request.error)
        self.scheduler.note_finish_rate(len(finished) / max(now - started, 1e-6))
        return outputs

    def _step_rows_alone(self, batch: list[Request]) -> list[int | RequestFailed | None]:
        """After a failed step: each row once more on its own, so only the row that makes the
        step fail fails. A failed forward advanced nobody, so a retry rewrites the same places."""
        results: list[int | RequestFailed | None] = []
        for request in batch:
            try:
                results.append(self.runner.step([request])[0])
            except Exception as exc:
                log.exception("request %s fails its step alone", request.request_id)
                results.append(RequestFailed(f"generation failed: {exc}"))
        return results

    def _admit(self, request: Request) -> StepOutput | None:
        request.slot = self.free_slots.popleft()
        try:
            self.runner.load_prefix(request.slot, request.prefix)
        except Exception as exc:  # this request's prefix only; the batch goes on
            log.exception("loading the prefix of %s failed", request.request_id)
            self._retire(request, "error", RequestFailed(f"prefix could not be loaded: {exc}"))
            return StepOutput(request, [], "")
        self.running.append(request)
        self.metrics.prompt_tokens += len(request.prompt_token_ids)
        return None

    def _postprocess(self, request: Request, token: int, now: float) -> StepOutput:
        if request.first_token_time is None:
            request.first_token_time = now
            self.metrics.time_to_first_token.observe(now - request.arrival_time)
        elif request.last_token_time is not None:
            self.metrics.inter_token_latency.observe(now - request.last_token_time)
        request.last_token_time = now
        self.metrics.generated_tokens += 1
        append_token(request, token, eos_token_ids=self.eos_token_ids, max_len=self.max_len)
        text = update_text(request, self.loaded.tokenizer)
        return StepOutput(request, [token], text)

    def _retire(self, request: Request, reason: str, error: RequestFailed | None = None) -> None:
        """Free the slot of a request that was admitted, then release it."""
        if request.slot >= 0:
            self.free_slots.append(request.slot)
            request.slot = -1
            self.scheduler.finished(request)
        self._release(request, reason, error)

    def _release(self, request: Request, reason: str, error: RequestFailed | None) -> None:
        request.finish_reason = reason
        request.error = error
        self.metrics.requests_finished[reason] += 1
        if request.release is not None:
            release, request.release = request.release, None
            release()
