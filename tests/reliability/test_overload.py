"""Overload: a driver offers about ten times what the server can finish, for a bounded time.

- Every request is answered: 200, or 429 `overloaded` with a Retry-After header (delta-seconds)
  as soon as the queue is full; never a 5xx, a hang, or a dropped connection.
- Every accepted request gets exactly the tokens the same request gets alone on the idle server
  (greedy rows, and a seeded sampled row).
- The server's resident memory (VmRSS) grows by at most MEMORY_BOUND between the start and the
  end of the load.

The capacity is measured first (closed loop, twice as many clients as slots), then the load is
offered open loop at OVERLOAD x that rate for LOAD_SECONDS (30 s in CI to stay within its time;
the issue's figure is 60: RELIABILITY_LOAD_SECONDS=60). The figures are printed (pytest -s).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import h11
import pytest

from tests.reliability.common import (
    Live,
    MiB,
    bearer,
    build_world,
    live_server,
    metric,
    post_json,
    resident_bytes,
    wait_until,
)

LOAD_SECONDS = float(os.environ.get("RELIABILITY_LOAD_SECONDS", "30"))
OVERLOAD = 10  # offered rate / measured capacity
MAX_WAITING = 16  # the server's queue: beyond it, 429
NEW_TOKENS = 96  # prompts of <= 6 tokens and prefixes of <= 6: within max_len 128
MEMORY_BOUND = 32 * MiB
ANSWER_WITHIN = 300  # seconds: a request not answered by then counts as hung


@dataclass(frozen=True)
class Shape:
    tenant: str
    body: dict[str, Any]


SHAPES = [
    Shape("alice", {"prompt": [3, 14, 15, 92], "prefix": "alice/pirate"}),
    Shape("alice", {"prompt": [1, 2, 3]}),
    Shape("bob", {"prompt": [9, 8, 7, 6, 5], "prefix": "bob/poet"}),
    Shape("bob", {"prompt": [42, 7], "prefix": "bob/poet", "temperature": 0.8, "seed": 11}),
    Shape("alice", {"prompt": "w5 w6 w7 w8 w9 w10", "prefix": "pirate", "top_k": 40}),
]


def body_of(shape: Shape) -> dict[str, Any]:
    return {"max_new_tokens": NEW_TOKENS, "temperature": 0, **shape.body}


@dataclass
class Outcome:
    shape: int
    status: int = 0
    token_ids: list[int] = field(default_factory=list)
    retry_after: str | None = None
    error: str | None = None  # a transport failure or an unexpected body


async def send(live: Live, index: int) -> Outcome:
    shape = SHAPES[index]
    outcome = Outcome(index)
    try:
        answer = await asyncio.wait_for(
            post_json(live.url, "/v1/generate", body_of(shape), bearer(live.keys[shape.tenant])),
            ANSWER_WITHIN,
        )
        body = answer.json()
    except (OSError, h11.ProtocolError, TimeoutError, ValueError) as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
        return outcome
    outcome.status = answer.status
    assert isinstance(body, dict)
    if answer.status == 200:
        outcome.token_ids = list(body["token_ids"])
    elif answer.status == 429:
        outcome.retry_after = answer.headers.get("retry-after")
        if body.get("error", {}).get("type") != "overloaded":
            outcome.error = f"429 body: {answer.body[:200]!r}"
    else:
        outcome.error = f"{answer.status}: {answer.body[:200]!r}"
    return outcome


async def closed_loop(live: Live, clients: int, seconds: float) -> tuple[list[Outcome], float]:
    """`clients` clients, each sending its next request when the last one is answered."""
    outcomes: list[Outcome] = []
    started = time.monotonic()

    async def worker(k: int) -> None:
        i = k
        while time.monotonic() - started < seconds:
            outcomes.append(await send(live, i % len(SHAPES)))
            i += clients

    await asyncio.gather(*(worker(k) for k in range(clients)))
    return outcomes, time.monotonic() - started


@dataclass
class Load:
    outcomes: list[Outcome]
    offered_per_second: float
    memory: list[tuple[float, int]]  # (seconds since the start, VmRSS bytes)


async def open_loop(live: Live, rate: float, seconds: float) -> Load:
    """A new request every 1/rate s whatever the answers, for `seconds`; then wait for all."""
    memory: list[tuple[float, int]] = []
    loop = asyncio.get_running_loop()
    started = loop.time()
    tasks: list[asyncio.Task[Outcome]] = []
    memory.append((0.0, resident_bytes(live.pid)))
    next_sample = 1.0
    while (now := loop.time() - started) < seconds:
        if now >= next_sample:
            memory.append((now, resident_bytes(live.pid)))
            next_sample += 1.0
        due = len(tasks) / rate
        if due > now:
            await asyncio.sleep(min(due - now, 0.05))
            continue
        tasks.append(asyncio.create_task(send(live, len(tasks) % len(SHAPES))))
        await asyncio.sleep(0)  # let the new request start before the next one
    offered = len(tasks) / (loop.time() - started)
    outcomes = list(await asyncio.gather(*tasks))
    memory.append((loop.time() - started, resident_bytes(live.pid)))
    return Load(outcomes, offered, memory)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("overload")
    world = build_world(root)
    settings = {"max_waiting": MAX_WAITING, "max_new_tokens_limit": NEW_TOKENS}
    with live_server(world, root / "server.log", **settings) as live:
        yield live


def test_overload_gets_429_with_retry_after_and_accepted_requests_stay_exact(
    live: Live,
) -> None:
    # Each shape alone on the idle server: the answer every accepted request must get.
    expected = {}
    for index in range(len(SHAPES)):
        outcome = asyncio.run(send(live, index))
        assert outcome.status == 200, outcome.error
        expected[index] = outcome.token_ids
        assert len(outcome.token_ids) == NEW_TOKENS

    # Capacity: requests finished per second with every slot busy (this also warms the server).
    warm, elapsed = asyncio.run(closed_loop(live, 8, 5.0))
    assert all(o.status == 200 for o in warm), Counter(o.error for o in warm if o.error)
    capacity = len(warm) / elapsed
    wait_idle(live)

    load = asyncio.run(open_loop(live, OVERLOAD * capacity, LOAD_SECONDS))
    wait_idle(live)
    statuses = Counter(o.status for o in load.outcomes)
    start_rss, end_rss = load.memory[0][1], load.memory[-1][1]
    print(
        f"\ncapacity {capacity:.1f} req/s; offered {load.offered_per_second:.1f} req/s "
        f"({load.offered_per_second / capacity:.1f}x) for {LOAD_SECONDS:.0f} s: "
        f"{len(load.outcomes)} requests, statuses {dict(statuses)}; VmRSS "
        f"{start_rss / MiB:.1f} -> {end_rss / MiB:.1f} MiB "
        f"(peak {max(b for _, b in load.memory) / MiB:.1f})"
    )

    errors = Counter(o.error for o in load.outcomes if o.error)
    assert not errors, f"requests neither accepted nor refused with 429: {errors}"
    assert statuses[429] > 0, "the offered load never filled the queue: no 429 at all"
    assert statuses[200] > 0, "no request was accepted under load"
    bad_retry = [o.retry_after for o in load.outcomes if o.status == 429]
    bad_retry = [r for r in bad_retry if r is None or not r.isdigit() or int(r) < 1]
    assert not bad_retry, f"429 without a Retry-After of whole seconds >= 1: {bad_retry[:5]}"
    wrong = [
        (SHAPES[o.shape], o.token_ids, expected[o.shape])
        for o in load.outcomes
        if o.status == 200 and o.token_ids != expected[o.shape]
    ]
    assert not wrong, f"{len(wrong)} accepted requests got other tokens than alone: {wrong[:3]}"
    grown = end_rss - start_rss
    assert grown <= MEMORY_BOUND, (
        f"VmRSS grew by {grown / MiB:.1f} MiB over the load (bound {MEMORY_BOUND / MiB:.0f}): "
        f"{[(round(t), round(b / MiB, 1)) for t, b in load.memory]}"
    )


def wait_idle(live: Live) -> None:
    def busy() -> tuple[float, float]:
        return (
            metric(live.url, "prefix_server_running_rows"),
            metric(live.url, "prefix_server_queue_depth"),
        )

    wait_until(lambda: busy() == (0, 0), 120, lambda: f"(running, waiting) = {busy()}")
