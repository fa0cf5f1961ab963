"""The serving engine: `EngineCore` on its own thread, async streams for the callers.

The engine thread alone touches the scheduler, the KV blocks and every running request. Callers
post messages (a new request, a cancellation, stop) to an inbox that the thread reads at the top
of each step; the only state they share with it is that inbox and the admission gate's counters
(so that `submit` answers 429 at once). The event loop never runs model code, and an idle engine
waits on a condition variable instead of spinning.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from prefixes import CompiledPrefix
from server.device_share import UNSHARED, DeviceShare
from server.engine.blocks import RESERVED_BLOCKS
from server.engine.config import EngineConfig
from server.engine.core import EngineCore, StepOutput, group_noun
from server.engine.gate import AdmissionGate
from server.engine.logprobs import ChosenLogprobs
from server.engine.metrics import EngineMetrics
from server.engine.request import (
    InvalidRequest,
    Request,
    RequestFailed,
    RequestGroup,
    SamplingParams,
)
from server.engine.stream import Chunk, RequestStream
from server.models import LoadedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class KVBlocks:
    total: int
    free: int  # read from another thread: a snapshot, possibly one step old


class EngineStopped(Exception):
    """The engine is shutting down and takes no new requests."""


@dataclass(frozen=True, slots=True)
class _Submit:
    request: Request  # a group's leader stands for the group
    streams: list[RequestStream]


@dataclass(frozen=True, slots=True)
class _Cancel:
    request: Request


class Engine:
    def __init__(
        self,
        loaded: LoadedModel,
        config: EngineConfig | None = None,
        *,
        device_share: DeviceShare = UNSHARED,
    ) -> None:
        config = config or EngineConfig()
        self.gate = AdmissionGate(config.max_waiting, config.max_waiting_per_tenant)
        self.core = EngineCore(loaded, config, self.gate)
        # Fine-tuning jobs take turns with the steps on the same device (server/device_share.py).
        self.device_share = device_share
        self._inbox: list[_Submit | _Cancel] = []
        self._wake = threading.Condition()  # guards the inbox and the flags below
        self._accepting = True
        self._stop = False
        # Engine thread only: the stream of every request it holds.
        self._streams: dict[str, RequestStream] = {}
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    @property
    def metrics(self) -> EngineMetrics:
        return self.core.metrics

    @property
    def num_running(self) -> int:
        return len(self.core.running)

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet finished (waiting or running)."""
        return self.gate.in_flight

    def kv_blocks(self) -> KVBlocks:
        pool = self.core.scheduler.pool
        return KVBlocks(total=pool.num_blocks - RESERVED_BLOCKS, free=pool.num_free)

    def waiting_per_tenant(self) -> dict[str, int]:
        return self.gate.waiting_per_tenant()

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
        on_finish: Callable[[Request], None] | None = None,
    ) -> RequestStream:
        """Queue a request; call from a coroutine. Raises InvalidRequest, Overloaded, EngineStopped.

        `release` is called once when the request leaves the engine (it unpins the prefix
        version the request started with), also when `submit` itself raises; `on_finish` with
        the request when it leaves (not when `submit` raises).
        """
        (stream,) = self.submit_group(
            prompt_token_ids,
            sampling,
            [(prefix, release)],
            tenant=tenant,
            stream_text=stream_text,
            on_finish=on_finish,
        )
        return stream

    def submit_group(
        self,
        prompt_token_ids: list[int],
        sampling: SamplingParams | None,
        members: Sequence[tuple[CompiledPrefix | None, Callable[[], None] | None]],
        *,
        lockstep: bool = False,
        tenant: str = "default",
        stream_text: bool = True,
        choices: int = 1,
        on_finish: Callable[[Request], None] | None = None,
    ) -> list[RequestStream]:
        """Queue one prompt under each member's prefix, the rows admitted together (a prompt
        ensemble; one member is a plain request). Lockstep: the rows decode as one (see
        RequestGroup) and the one stream is the group's output; otherwise each member's row has
        its own stream and records its tokens' log-probabilities. Each member's release is
        called once when its row leaves the engine, also when this raises.

        `choices` > 1 (one member only): that many rows of the one prompt, prefilled once
        (RequestGroup.shares_prompt), each with its own stream; with a seed, choice i samples
        with seed + i. The member's release is called when the last of them leaves.

        `on_finish` is called with each row as it leaves the engine (not when this raises).
        """
        requests: list[Request] = []
        entered: list[Request] = []
        sampling = sampling or SamplingParams()
        try:
            if choices > 1:
                members = self._choices(members, choices)
            for index, (prefix, release) in enumerate(members):
                seed = None if sampling.seed is None or choices == 1 else sampling.seed + index
                requests.append(
                    Request(
                        prompt_token_ids,
                        sampling if seed is None else replace(sampling, seed=seed),
                        prefix,
                        tenant=tenant,
                        release=release,
                        on_finish=on_finish,
                        stream_text=stream_text,
                        vote_logprobs=len(members) > 1 and not lockstep and choices == 1,
                    )
                )
            if len(requests) > 1:
                field = "n" if choices > 1 else "prefixes"
                self.core.check_group(len(requests), field)
                self._check_group_queues(len(requests), field)
                RequestGroup(requests, lockstep=lockstep, shares_prompt=choices > 1)
            for request in requests:
                self.core.check(request)
            loop = asyncio.get_running_loop()
            published = requests[:1] if lockstep else requests
            streams = [RequestStream(r, loop, self._post_cancel) for r in published]
            with self._wake:
                if not self._accepting:
                    raise EngineStopped("the server is shutting down")
                for request in requests:
                    self.gate.enter(request.request_id, tenant)
                    entered.append(request)
                self._inbox.append(_Submit(requests[0], streams))
                self._wake.notify()
        except BaseException:
            for request in entered:
                self.gate.done(request.request_id, tenant)
            for _, release in members:
                if release is not None:
                    release()
            raise
        return streams

    @staticmethod
    def _choices(
        members: Sequence[tuple[CompiledPrefix | None, Callable[[], None] | None]], count: int
    ) -> list[tuple[CompiledPrefix | None, Callable[[], None] | None]]:
        """`count` rows of the one member, its release called once, by the last to leave."""
        if len(members) != 1:
            raise InvalidRequest("n: several choices of an ensemble are not supported")
        ((prefix, release),) = members
        if release is None:
            return [(prefix, None)] * count
        left = [count]
        lock = threading.Lock()

        def release_last() -> None:
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                release()

        return [(prefix, release_last)] * count

    def _check_group_queues(self, size: int, field: str) -> None:
        """A group's rows enter the queue together (each counts as a request waiting), so a
        group larger than the queue or a tenant's share of it would be refused with 429 on
        every try: it could never run, which is the caller's error, like too many slots."""
        limit = self.gate.tenant_queue_limit
        if size > limit:
            raise InvalidRequest(
                f"{field}: expected at most {limit} {group_noun(field)} (the requests one "
                f"tenant may queue), found {size}"
            )

    def stop_accepting(self) -> None:
        with self._wake:
            self._accepting = False

    def drain(self, timeout: float) -> bool:
        """Stop taking requests and wait up to `timeout` s for the admitted ones; True if idle."""
        self.stop_accepting()
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.02)
        return not self.in_flight

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel whatever is left and join the thread."""
        with self._wake:
            self._accepting = False
            self._stop = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)
        elif self._thread.ident is None:  # never started: nobody else will release what waits
            self._shut_down()

    def _post_cancel(self, request: Request) -> None:
        with self._wake:
            self._inbox.append(_Cancel(request))
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not (self._stop or self._inbox or self.core.has_work):
                    self._wake.wait()
                inbox, self._inbox = self._inbox, []
                stopping = self._stop
            self._publish(self._read(inbox))
            if stopping:
                self._shut_down()
                return
            try:
                with self.device_share.engine_step():
                    outputs = self.core.step()
            except Exception:  # a bug in the step itself: fail what runs, keep serving
                log.exception("engine step crashed")
                error = RequestFailed("internal error in the engine step")
                outputs = [
                    StepOutput(row, [], "")
                    for request in list(self.core.running)
                    for row in self.core.abort(request, "error", error)
                ]
                # Requests that left in this step before it crashed lost their outputs too.
                outputs += [
                    StepOutput(stream.request, [], "")
                    for stream in self._streams.values()
                    if stream.request.finished
                ]
            self._publish(outputs)

    def _read(self, inbox: list[_Submit | _Cancel]) -> list[StepOutput]:
        """Apply the callers' messages, in the order they were posted."""
        outputs = []
        for message in inbox:
            request = message.request
            if isinstance(message, _Submit):
                for stream in message.streams:
                    self._streams[stream.request_id] = stream
                self.core.scheduler.add(request)
            else:
                outputs += [StepOutput(row, [], "") for row in self.core.abort(request)]
        return outputs

    def _shut_down(self) -> None:
        """Cancel every request still held, and those posted but never read."""
        with self._wake:
            inbox, self._inbox = self._inbox, []
        outputs = self._read(inbox)
        waiting = [r for queue in self.core.scheduler.queues.values() for r in queue]
        for request in list(self.core.running) + waiting:
            outputs += [StepOutput(row, [], "") for row in self.core.abort(request)]
        self._publish(outputs)

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
                logprobs = chunk_logprobs(request, len(out.token_ids))
                stream.push(Chunk(out.token_ids, out.text, request.finish_reason, logprobs))


def chunk_logprobs(request: Request, new_tokens: int) -> list[ChosenLogprobs]:
    """The log-probs of a request's `new_tokens` last tokens, when it asked for them."""
    if request.sampling.logprobs is None or not new_tokens:
        return []
    chosen = request.output_logprobs[-new_tokens:]
    top = request.output_top_logprobs[-new_tokens:]
    return list(zip(chosen, top, strict=True))
