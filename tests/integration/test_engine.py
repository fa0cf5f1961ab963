"""The threaded engine: exact tokens under concurrency, fairness, back-pressure, cancellation,
fault containment, no leaks."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter

import pytest
import torch

from prefixes import CompiledPrefix, PrefixKind, RawPrefix
from server.engine.config import EngineConfig
from server.engine.engine import Engine, EngineStopped
from server.engine.gate import Overloaded
from server.engine.llm import LLM
from server.engine.request import InvalidRequest, Request, SamplingParams
from server.engine.stream import RequestFailed
from server.models import LoadedModel
from tests.tiny import tiny_loaded

GREEDY = SamplingParams(max_new_tokens=6, temperature=0)


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return tiny_loaded("llama")


@pytest.fixture(scope="module")
def prefixes(loaded: LoadedModel) -> list[CompiledPrefix]:
    spec, generator = loaded.spec, torch.Generator().manual_seed(0)
    made = []
    for i in range(4):
        tokens = 3 + 2 * i
        if i % 2:
            raw = RawPrefix(
                PrefixKind.PROMPT_TUNING, torch.randn(tokens, spec.hidden_size, generator=generator)
            )
        else:
            shape = (spec.num_layers, 2, spec.num_kv_heads, tokens, spec.head_dim)
            raw = RawPrefix(PrefixKind.PREFIX_TUNING, torch.randn(shape, generator=generator))
        made.append(loaded.compile(raw, max_virtual_tokens=64))
    return made


def all_blocks_back(engine: Engine) -> bool:
    """No row holds a block: only resident prefixes do."""
    scheduler = engine.core.scheduler
    return scheduler.blocks_in_use == scheduler.prefixes.num_blocks


def alone(loaded: LoadedModel, prompt: list[int], prefix: CompiledPrefix | None) -> list[int]:
    (request,) = LLM(loaded, num_slots=1, max_len=128).generate([Request(prompt, GREEDY, prefix)])
    return request.output_token_ids


class Releases:
    """Counts `release` calls per request, as the registry's pinned handles would."""

    def __init__(self) -> None:
        self.counts: Counter[int] = Counter()

    def for_(self, key: int):
        return lambda: self.counts.update([key])


def test_concurrent_staggered_and_cancelled_requests_get_their_solo_tokens(
    loaded: LoadedModel, prefixes: list[CompiledPrefix]
) -> None:
    rng = random.Random(0)
    jobs = [
        ([rng.randrange(384) for _ in range(rng.randint(1, 12))], rng.choice([None, *prefixes]))
        for _ in range(24)
    ]
    expected = [alone(loaded, prompt, prefix) for prompt, prefix in jobs]
    releases = Releases()
    engine = Engine(loaded, EngineConfig(num_slots=5, max_len=128)).start()

    async def one(i: int) -> tuple[list[int], str]:
        await asyncio.sleep(rng.random() * 0.05)  # staggered arrivals
        prompt, prefix = jobs[i]
        stream = engine.submit(
            prompt, GREEDY, prefix=prefix, tenant=f"t{i % 3}", release=releases.for_(i)
        )
        if i % 5 == 4:  # cancel after the first chunk
            async for _ in stream:
                stream.cancel()
            return [], stream.request.finish_reason or ""
        result = await stream.result()
        return result.token_ids, result.finish_reason

    async def main() -> list[tuple[list[int], str]]:
        return await asyncio.gather(*(one(i) for i in range(len(jobs))))

    try:
        results = asyncio.run(main())
    finally:
        engine.stop()
    for i, (tokens, reason) in enumerate(results):
        if i % 5 == 4:
            assert reason in ("cancelled", "length")
        else:
            assert (tokens, reason) == (expected[i], "length"), i
    assert releases.counts == Counter(range(len(jobs)))  # every pin released exactly once
    assert all_blocks_back(engine)


def test_flooding_tenant_cannot_hold_back_another(loaded: LoadedModel) -> None:
    config = EngineConfig(num_slots=4, max_waiting=500, max_running_per_tenant=3, max_len=128)
    engine = Engine(loaded, config)
    long = SamplingParams(max_new_tokens=20, temperature=0)

    async def main() -> tuple[int, int]:
        flood = [engine.submit([1, 2, 3], long, tenant="a") for _ in range(200)]
        engine.start()
        await asyncio.sleep(0.05)
        steps_before = engine.metrics.steps
        late = engine.submit([4, 5, 6], long, tenant="b")
        async for _ in late:
            break  # first token
        steps_to_first_token = engine.metrics.steps - steps_before
        for stream in flood:
            stream.cancel()
        await late.result()
        return steps_to_first_token, engine.waiting_per_tenant().get("a", 0)

    try:
        steps, _ = asyncio.run(main())
    finally:
        engine.stop()
    # b is admitted at the first step after a slot frees (a holds at most 3 of 4 slots):
    # its first token comes within a couple of steps, not after 200 requests.
    assert steps <= 3


def test_full_queue_refuses_at_once_with_a_retry_hint(loaded: LoadedModel) -> None:
    engine = Engine(loaded, EngineConfig(max_waiting=3, max_len=128))  # not started: nothing drains
    releases = Releases()

    async def main() -> None:
        for i in range(3):
            engine.submit([1, 2], GREEDY, release=releases.for_(i))
        with pytest.raises(Overloaded) as caught:
            engine.submit([1, 2], GREEDY, release=releases.for_(99))
        assert caught.value.retry_after >= 1

    asyncio.run(main())
    assert releases.counts == Counter([99])  # the refused request's pin is released at once
    engine.stop()
    assert releases.counts == Counter([0, 1, 2, 99])  # stopping releases what still waited


def test_cancel_frees_the_slot_by_the_next_step_and_ends_the_stream(loaded: LoadedModel) -> None:
    engine = Engine(loaded, EngineConfig(num_slots=2, max_len=128)).start()
    endless = SamplingParams(max_new_tokens=100, temperature=0, ignore_eos=True)

    async def main() -> list[str | None]:
        stream = engine.submit([1, 2, 3], endless)
        reasons = []
        async for chunk in stream:
            if len(reasons) == 2:
                stream.cancel()
            reasons.append(chunk.finish_reason)
        released = threading.Event()
        walked_away = engine.submit([1, 2, 3], endless, release=released.set)
        async for _ in walked_away:
            break  # the consumer leaves mid-stream: the engine cancels the request
        # The engine frees the slot and counts the request before it releases the pin.
        assert await asyncio.to_thread(released.wait, 10), "the walked-away request never left"
        return reasons

    try:
        reasons = asyncio.run(main())
        assert reasons[-1] == "cancelled" and len(reasons) < 100
        assert all_blocks_back(engine) and not engine.core.running
        assert engine.metrics.requests_finished["cancelled"] == 2
    finally:
        engine.stop()


def test_a_prefix_of_the_wrong_geometry_is_refused_at_submit(loaded: LoadedModel) -> None:
    broken = CompiledPrefix(PrefixKind.PREFIX_TUNING, torch.zeros(1, 2, 1, 3, 1), "broken")
    engine = Engine(loaded, EngineConfig(num_slots=4, max_len=128))
    released = threading.Event()

    async def main() -> None:
        with pytest.raises(InvalidRequest, match=r"prefix: expected KV of shape"):
            engine.submit([5, 6, 7], GREEDY, prefix=broken, release=released.set)

    asyncio.run(main())
    assert released.is_set() and engine.in_flight == 0


def test_a_prefix_that_fails_to_load_fails_only_its_request(
    loaded: LoadedModel, prefixes: list[CompiledPrefix]
) -> None:
    engine = Engine(loaded, EngineConfig(num_slots=4, max_len=128))
    load = engine.core.runner.cache.load_prefix

    def faulty(blocks, prefix):
        if prefix is prefixes[2]:
            raise RuntimeError("device lost")
        return load(blocks, prefix)

    engine.core.runner.cache.load_prefix = faulty  # type: ignore[method-assign]
    engine.start()

    async def main() -> tuple[list[int], BaseException | None]:
        good = engine.submit([5, 6, 7], GREEDY, prefix=prefixes[0])
        bad = engine.submit([5, 6, 7], GREEDY, prefix=prefixes[2], tenant="other")
        failure = None
        try:
            await bad.result()
        except RequestFailed as exc:
            failure = exc
        return (await good.result()).token_ids, failure

    try:
        tokens, failure = asyncio.run(main())
    finally:
        engine.stop()
    assert tokens == alone(loaded, [5, 6, 7], prefixes[0])
    assert failure is not None and "prefix could not be loaded: device lost" in str(failure)
    assert prefixes[2].digest not in engine.core.scheduler.prefixes.resident  # never half-served
    assert all_blocks_back(engine)


def test_a_row_that_makes_the_step_fail_fails_alone_and_the_engine_keeps_serving(
    loaded: LoadedModel, prefixes: list[CompiledPrefix]
) -> None:
    """A fault tied to one row (here: any forward that holds its third token) fails the batch's
    step; the engine runs the rows again one by one, and only that row fails."""
    engine = Engine(loaded, EngineConfig(num_slots=4, max_len=128))
    forward = engine.core.runner.forward
    poison = [66, 66, 66]

    def faulty(rows):
        if any(
            row.request.prompt_token_ids == poison and len(row.request.output_token_ids) == 2
            for row in rows
        ):
            raise RuntimeError("injected fault")
        return forward(rows)

    engine.core.runner.forward = faulty  # type: ignore[method-assign]
    engine.start()
    jobs = [([1, 2, 3], None), ([4, 5], prefixes[0]), ([7, 8, 9, 10], prefixes[1])]

    async def main() -> tuple[list[list[int]], str, list[int]]:
        victims = [
            engine.submit(p, GREEDY, prefix=x, tenant=f"t{i}") for i, (p, x) in enumerate(jobs)
        ]
        culprit = engine.submit(poison, GREEDY, tenant="mallory")
        with pytest.raises(RequestFailed) as failed:
            await culprit.result()
        tokens = [(await v.result()).token_ids for v in victims]
        after = await engine.submit(poison[:2], GREEDY).result()
        return tokens, str(failed.value), after.token_ids

    try:
        tokens, error, after = asyncio.run(main())
    finally:
        engine.stop()
    assert error == "generation failed: injected fault"
    assert tokens == [alone(loaded, p, x) for p, x in jobs]
    assert after == alone(loaded, [66, 66], None)
    assert engine.metrics.failed_steps == 1
    assert engine.metrics.requests_finished["error"] == 1


def test_a_thousand_requests_leak_no_slot_thread_or_stream(loaded: LoadedModel) -> None:
    threads_before = threading.active_count()
    engine = Engine(loaded, EngineConfig(num_slots=16, max_waiting=2000, max_len=64)).start()
    short = SamplingParams(max_new_tokens=2, temperature=0)

    async def main() -> int:
        streams = [engine.submit([i % 300 + 1, 7], short, tenant=f"t{i % 7}") for i in range(1000)]
        for stream in streams[::10]:
            stream.cancel()
        results = await asyncio.gather(*(s.result() for s in streams))
        return sum(r.finish_reason == "length" for r in results)

    try:
        finished = asyncio.run(main())
        assert finished >= 900
        assert sum(engine.metrics.requests_finished.values()) == 1000
        assert all_blocks_back(engine) and not engine.core.running
        assert (
            engine.core.scheduler.num_waiting == 0 and not engine.core.scheduler.running_per_tenant
        )
        assert not engine._streams and engine.in_flight == 0 and not engine.waiting_per_tenant()
    finally:
        engine.stop()
    assert not engine.alive
    assert threading.active_count() == threads_before


def test_a_finished_request_has_left_the_engine_when_its_result_arrives(
    loaded: LoadedModel, prefixes: list[CompiledPrefix]
) -> None:
    """The awaiting side inspects the engine the moment its result arrives, hundreds of times:
    the stream map, its blocks, the running set and the tenant's count must already be retired."""
    engine = Engine(loaded, EngineConfig(num_slots=4, max_waiting=500, max_len=64)).start()
    short = SamplingParams(max_new_tokens=1, temperature=0)
    stale: list[str] = []

    async def one(i: int) -> None:
        stream = engine.submit([i % 300 + 1], short, prefix=prefixes[i % 4], tenant=f"t{i % 3}")
        await stream.result()
        request = stream.request
        if stream.request_id in engine._streams:
            stale.append(f"{stream.request_id}: still in the stream map")
        if request.block_table or request in engine.core.running:
            stale.append(f"{stream.request_id}: still holds blocks {request.block_table}")

    async def main() -> None:
        for _ in range(10):  # waves, so results arrive while other rows are mid-step
            await asyncio.gather(*(one(i) for i in range(40)))

    try:
        asyncio.run(main())
        assert not engine.core.scheduler.running_per_tenant
    finally:
        engine.stop()
    assert stale == []


def test_an_idle_engine_sleeps(loaded: LoadedModel) -> None:
    engine = Engine(loaded, EngineConfig(max_len=64)).start()

    async def main() -> None:
        await engine.submit([1], GREEDY).result()

    try:
        asyncio.run(main())
        steps = engine.metrics.steps
        time.sleep(0.3)
        assert engine.metrics.steps == steps
    finally:
        engine.stop()


def test_submit_after_shutdown_is_refused(loaded: LoadedModel) -> None:
    engine = Engine(loaded, EngineConfig(max_len=64)).start()
    engine.stop()

    async def main() -> None:
        with pytest.raises(EngineStopped):
            engine.submit([1], GREEDY)

    asyncio.run(main())


def test_invalid_requests_are_refused_at_submit(loaded: LoadedModel) -> None:
    engine = Engine(loaded, EngineConfig(max_len=64))

    async def main() -> None:
        with pytest.raises(ValueError, match="token ids"):
            engine.submit([10_000], GREEDY)
        with pytest.raises(ValueError, match="prompt"):
            engine.submit([1] * 64, GREEDY)

    asyncio.run(main())


def test_a_crashed_step_still_ends_the_streams_it_had_already_retired(
    loaded: LoadedModel, prefixes: list[CompiledPrefix]
) -> None:
    """A bug after admission (here, in postprocessing) loses the step's outputs; a request it
    had already retired (a prefix that failed to load) must still get its last chunk."""
    engine = Engine(loaded, EngineConfig(num_slots=4, max_len=128))
    load = engine.core.runner.cache.load_prefix

    def faulty(blocks, prefix):
        if prefix is prefixes[2]:
            raise RuntimeError("device lost")
        return load(blocks, prefix)

    engine.core.runner.cache.load_prefix = faulty  # type: ignore[method-assign]
    postprocess = engine.core._postprocess
    crashes = iter([True])

    def crash_once(*args):
        if next(crashes, False):
            raise RuntimeError("injected bug")
        return postprocess(*args)

    engine.core._postprocess = crash_once  # type: ignore[method-assign]

    async def main() -> list[str]:
        streams = [
            engine.submit([5, 6, 7], GREEDY, prefix=prefixes[0]),
            engine.submit([5, 6, 7], GREEDY, prefix=prefixes[2], tenant="other"),
        ]
        engine.start()
        errors = []
        for stream in streams:
            with pytest.raises(RequestFailed) as failed:
                await asyncio.wait_for(stream.result(), timeout=30)
            errors.append(str(failed.value))
        return errors

    try:
        errors = asyncio.run(main())
        assert not engine._streams and engine.in_flight == 0 and not engine.waiting_per_tenant()
    finally:
        engine.stop()
    assert errors[0] == "internal error in the engine step"
    assert errors[1].startswith("prefix could not be loaded")


def test_a_release_callback_that_raises_does_not_stop_the_engine(loaded: LoadedModel) -> None:
    engine = Engine(loaded, EngineConfig(num_slots=2, max_len=64)).start()

    def broken_release() -> None:
        raise RuntimeError("unpin failed")

    async def main() -> tuple[list[int], list[int]]:
        first = await engine.submit([1, 2, 3], GREEDY, release=broken_release).result()
        cancelled = engine.submit([4, 5], SamplingParams(max_new_tokens=50, temperature=0),
                                  release=broken_release)  # fmt: skip
        cancelled.cancel()
        second = await asyncio.wait_for(engine.submit([1, 2, 3], GREEDY).result(), timeout=30)
        return first.token_ids, second.token_ids

    try:
        first, second = asyncio.run(main())
        assert engine.alive and first == second == alone(loaded, [1, 2, 3], None)
        wait = time.monotonic() + 10
        while engine.in_flight and time.monotonic() < wait:
            time.sleep(0.01)
        assert engine.in_flight == 0
    finally:
        engine.stop()
