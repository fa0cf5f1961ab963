"""The serving engine: `EngineCore` on its own thread, async streams for the callers.

The event loop never runs model code. `submit` validates and queues at once (raising
Overloaded when the queue is full); the thread admits, steps and pushes each request's new
tokens to its stream; an idle engine waits on a condition variable instead of spinning.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

from prefixes import CompiledPrefix
from server.device_share import UNSHARED, DeviceShare
from server.engine.core import EngineCore, StepOutput
from server.engine.metrics import EngineMetrics
from server.engine.request import Request, RequestFailed, SamplingParams
from server.engine.scheduler import SchedulerConfig
from server.engine.stream import Chunk, RequestStream
from server.models import LoadedModel

log = logging.getLogger(__name__)


class EngineStopped(Exception):
    """The engine is shutting down and takes no new requests."""


class Engine:
    device_share: DeviceShare = UNSHARED  # set before start() to let training take turns

    def __init__(
        self, loaded: LoadedModel, config: SchedulerConfig | None = None, *, max_len: int = 2048
    ) -> None:
        self.core = EngineCore(loaded, config or SchedulerConfig(), max_len=max_len)
        self._lock = threading.Lock()  # guards the scheduler's queues and the cancel list
        self._wake = threading.Condition(self._lock)
        self._cancelled: list[Request] = []
        self._streams: dict[str, RequestStream] = {}
        self._accepting = True
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    @property
    def metrics(self) -> EngineMetrics:
        return self.core.metrics

    @property
    def num_running(self) -> int:
        return len(self.core.running)

    def waiting_per_tenant(self) -> dict[str, int]:
        with self._lock:
            return self.core.scheduler.waiting_per_tenant()

    def start(self) -> Engine:
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(
        self,
        prompt_token_ids: list[int],
        sampling: SamplingParams | None = None,
        *,
        prefix: CompiledPrefix | None = None,
        release: Callable[[], None] | None = None,
        tenant: str = "default",
        stream_text: bool = True,
    ) -> RequestStream:
        """Queue a request; call from a coroutine. Raises InvalidRequest, Overloaded, EngineStopped.

        `release` is called once when the request leaves the engine (it unpins the prefix
        version the request started with), also when `submit` itself raises.
        """
        try:
            request = Request(
                prompt_token_ids,
                sampling or SamplingParams(),
                prefix,
                tenant=tenant,
                release=release,
                stream_text=stream_text,
            )
            self.core.check(request)
            stream = RequestStream(request, asyncio.get_running_loop(), self._request_cancel)
            with self._wake:
                if not self._accepting:
                    raise EngineStopped("the server is shutting down")
                self.core.scheduler.add(request)
                self._streams[request.request_id] = stream
                self._wake.notify()
        except BaseException:
            if release is not None:
                release()
            raise
        return stream

    def stop_accepting(self) -> None:
        with self._lock:
            self._accepting = False

    def drain(self, timeout: float) -> bool:
        """Stop taking requests and wait up to `timeout` s for the admitted ones; True if idle."""
        self.stop_accepting()
        deadline = time.monotonic() + timeout
        while self.core.has_work and time.monotonic() < deadline:
            time.sleep(0.02)
        return not self.core.has_work

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel whatever is left and join the thread."""
        running = self._thread.is_alive()
        outputs: list[StepOutput] = []
        with self._wake:
            self._accepting = False
            self._stop = True
            self._wake.notify()
            if not running:  # never started: nobody else will release what waits
                outputs = self._abort_cancelled(everything=True)
        self._publish(outputs)
        if running:
            self._thread.join(timeout)

    def _abort_cancelled(self, *, everything: bool) -> list[StepOutput]:
        """With the lock held: finish the requests marked cancelled (or all of them)."""
        cancelled, self._cancelled = self._cancelled, []
        if everything:
            cancelled += self.core.running + self._all_waiting()
        return [
            StepOutput(request, [], "")
            for request in cancelled
            if self.core.abort(request, "cancelled")
        ]

    def _request_cancel(self, request: Request) -> None:
        with self._wake:
            if not request.cancel_requested:
                request.cancel_requested = True
                self._cancelled.append(request)
                self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not (self._stop or self._cancelled or self.core.has_work):
                    self._wake.wait()
                stopping = self._stop
                outputs = self._abort_cancelled(everything=stopping)
            # Published outside the lock: a stream whose loop has closed cancels itself, and
            # that takes the lock.
            self._publish(outputs)
            if stopping:
                return
            try:
                with self.device_share.engine_step():
                    outputs = self._step()
            except Exception:  # a bug in the step itself: fail what runs, keep serving
                log.exception("engine step crashed")
                for request in list(self.core.running):
                    self.core.abort(
                        request, "error", RequestFailed("internal error in the engine step")
                    )
                # Every stream whose request has left, in this step or before it crashed, gets
                # its last chunk: its outputs were lost with the exception.
                outputs = [
                    StepOutput(stream.request, [], "")
                    for stream in list(self._streams.values())
                    if stream.request.finished
                ]
            self._publish(outputs)

    def _step(self) -> list[StepOutput]:
        # Admission touches the queues that `submit` fills from other threads: take the lock
        # for it, but never for the forward pass.
        with self._lock:
            admitted = self.core.scheduler.admit(len(self.core.free_slots), self.core.running)
        return self.core.step(admitted)

    def _all_waiting(self) -> list[Request]:
        return [r for queue in self.core.scheduler.queues.values() for r in queue]

    def _publish(self, outputs: list[StepOutput]) -> None:
        for out in outputs:
            request = out.request
            # A finished request leaves the stream map BEFORE its last chunk is pushed: the push
            # wakes the consumer, which must then find the engine already without it.
            if request.finished:
                stream = self._streams.pop(request.request_id, None)
            else:
                stream = self._streams.get(request.request_id)
            if stream is not None and (out.token_ids or out.text or request.finished):
                stream.push(Chunk(out.token_ids, out.text, request.finish_reason))
