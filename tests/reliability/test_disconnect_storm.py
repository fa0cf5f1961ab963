"""A disconnect storm: hundreds of streams opened and dropped, two in three after their first
event (the request is running), one in three as soon as the response head arrives (the request
is queued, maybe still waiting for a slot). Afterwards the server holds nothing: zero running
rows, zero waiting requests, zero pinned prefix bytes (read on /metrics, waited on with a
deadline); every dropped request was cancelled rather than run to its end; and a normal request
gets the right tokens.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterator

import h11
import httpx
import pytest

from tests.e2e.test_server_process import reference
from tests.reliability.common import (
    Live,
    World,
    bearer,
    build_world,
    live_server,
    metric,
    wait_until,
)

STREAMS = 300
AT_ONCE = 48  # streams open at the same time
NEW_TOKENS = 110  # far more than a dropped stream lives for (max_len 128)
PREFIXES = ["alice/pirate", "bob/poet", None]
PROBE_PROMPT, PROBE_TOKENS = [9, 8, 7], 8
PROBE = {"prompt": PROBE_PROMPT, "prefix": "alice/pirate", "max_new_tokens": PROBE_TOKENS}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("storm"))


@pytest.fixture(scope="module")
def live(world: World) -> Iterator[Live]:
    with live_server(world, world.data_dir.parent / "server.log", max_waiting=512) as live:
        yield live


async def open_and_drop(live: Live, index: int, *, after_first_event: bool) -> str:
    """Send a streaming request, read its response head (and its first event), then drop the
    connection. Returns how it went: "dropped", or what went wrong."""
    prefix = PREFIXES[index % len(PREFIXES)]
    tenant = "bob" if prefix == "bob/poet" else "alice"
    body = {
        "prompt": [1 + index % 300, 2, 3],
        "prefix": prefix,
        "max_new_tokens": NEW_TOKENS,
        "temperature": 0,
        "stream": True,
    }
    payload = json.dumps(body).encode()
    host, _, port = live.url.removeprefix("http://").partition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    connection = h11.Connection(h11.CLIENT)
    fields = [
        ("Host", f"{host}:{port}"),
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(payload))),
        *bearer(live.keys[tenant]).items(),
    ]
    try:
        writer.write(
            connection.send(h11.Request(method="POST", target="/v1/generate", headers=fields))
        )
        writer.write(connection.send(h11.Data(data=payload)))
        writer.write(connection.send(h11.EndOfMessage()))
        await writer.drain()
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                connection.receive_data(await reader.read(1 << 16))
                continue
            if isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return "ended before its first event"
            if isinstance(event, h11.Response):
                if event.status_code != 200:
                    return f"status {event.status_code}"
                if not after_first_event:
                    return "dropped"  # queued, maybe still waiting for a slot
            elif isinstance(event, h11.Data) and b"data: " in bytes(event.data):
                return "dropped"  # running: its first event is here
    finally:
        writer.transport.abort()  # no FIN handshake, no reading what is left: gone


async def storm(live: Live) -> Counter[str]:
    gate = asyncio.Semaphore(AT_ONCE)

    async def one(index: int) -> str:
        async with gate:
            dropping = open_and_drop(live, index, after_first_event=index % 3 != 2)
            try:
                return await asyncio.wait_for(dropping, 120)
            except TimeoutError:
                return "no first event within 120 s"

    return Counter(await asyncio.gather(*(one(i) for i in range(STREAMS))))


def probe(live: Live) -> list[int]:
    response = httpx.post(
        f"{live.url}/v1/generate",
        json={**PROBE, "temperature": 0},
        headers=bearer(live.keys["alice"]),
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return list(response.json()["token_ids"])


def test_dropped_streams_leave_no_rows_no_waiting_and_no_pins(world: World, live: Live) -> None:
    before = probe(live)
    assert before == reference(world, PROBE_PROMPT, "pirate", PROBE_TOKENS)
    cancelled_before = metric(
        live.url, "prefix_server_requests_finished_total", 'reason="cancelled"'
    )
    finished_before = metric(live.url, "prefix_server_requests_finished_total")

    outcomes = asyncio.run(storm(live))
    assert outcomes == Counter(dropped=STREAMS), outcomes

    def held() -> dict[str, float]:
        return {
            "running rows": metric(live.url, "prefix_server_running_rows"),
            "waiting": metric(live.url, "prefix_server_queue_depth"),
            "pinned bytes": metric(live.url, "prefix_server_pool_pinned_bytes"),
        }

    wait_until(lambda: not any(held().values()), 120, lambda: f"the server still holds {held()}")
    finished = metric(live.url, "prefix_server_requests_finished_total") - finished_before
    cancelled = (
        metric(live.url, "prefix_server_requests_finished_total", 'reason="cancelled"')
        - cancelled_before
    )
    print(f"\n{STREAMS} streams dropped: {finished:.0f} finished, {cancelled:.0f} cancelled")
    assert finished == STREAMS, "a request of the storm is still in the engine"
    assert cancelled == STREAMS, "dropped requests ran on instead of being cancelled"
    assert probe(live) == before
