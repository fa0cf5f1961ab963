"""What the reliability battery shares: a real `prefix-server serve` process on a tiny random
model (started by the e2e tests' helper), two tenants with PEFT adapters, /metrics and /proc
readers, waiting on a condition with a deadline, and a cheap HTTP client for load drivers.

Server settings beyond the e2e helper's own flags travel as PREFIX_SERVER_* variables, which
`prefix-server serve` reads for every flag it was not given.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import h11
import httpx

from server.models import load_model
from tests.e2e.test_server_process import (
    ADMIN,
    Server,
    World,
    create_tenant,
    start_server,
    upload,
)
from tests.tiny import make_adapter, save_tiny_model

__all__ = [
    "ADMIN",
    "Answer",
    "Live",
    "MiB",
    "Server",
    "World",
    "bearer",
    "build_world",
    "live_server",
    "metric",
    "post_json",
    "resident_bytes",
    "wait_until",
]

MiB = 1 << 20


@dataclass
class Live:
    server: Server
    keys: dict[str, str]  # tenant -> API key
    prefixes: dict[str, str]  # tenant -> the reference of its own prefix

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def pid(self) -> int:
        return self.server.process.pid


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def build_world(root: Path) -> World:
    """The tiny llama and its word tokenizer in a folder, and two PEFT adapters."""
    model_dir = save_tiny_model(root / "model")
    loaded = load_model(str(model_dir))
    adapters = {"pirate": root / "pirate", "poet": root / "poet"}
    make_adapter(loaded.model, "prefix", 6, adapters["pirate"], seed=1)
    make_adapter(loaded.model, "prompt", 4, adapters["poet"], seed=2)
    return World(model_dir, root / "data", loaded, adapters)


@contextmanager
def live_server(world: World, log: Path, **settings: object) -> Iterator[Live]:
    """A server process with `settings` (Settings field names), alice owning `pirate` (prefix
    tuning) and bob owning `poet` (prompt tuning); stopped with SIGTERM, killed if it hangs."""
    variables = {f"PREFIX_SERVER_{k.upper()}": str(v) for k, v in settings.items()}
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        server = start_server(world.model_dir, world.data_dir, log)
    finally:  # the child has its copy of the environment; this process gets its own back
        for name, value in saved.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value
    try:
        keys = {"alice": create_tenant(server, "alice"), "bob": create_tenant(server, "bob")}
        upload(server, keys["alice"], "pirate", world.adapters["pirate"])
        upload(server, keys["bob"], "poet", world.adapters["poet"])
        yield Live(server, keys, {"alice": "alice/pirate", "bob": "bob/poet"})
    finally:
        if server.process.poll() is None:
            server.process.send_signal(signal.SIGTERM)
            try:
                server.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.process.kill()
                server.process.wait()


def metrics_text(url: str) -> str:
    response = httpx.get(f"{url}/metrics", timeout=30)
    response.raise_for_status()
    return response.text


def metric(url: str, name: str, labels: str = "") -> float:
    """A sample of /metrics: `labels` as the exposition writes them (`reason="cancelled"`), or
    none for the sum of every series of `name` (so a gauge reads the same with or without a
    label). Absent: 0."""
    total = 0.0
    for line in metrics_text(url).splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        series, _, rest = key.partition("{")
        if series == name and (not labels or rest == labels + "}"):
            total += float(value)
    return total


def resident_bytes(pid: int) -> int:
    """The process's resident set (VmRSS in /proc/<pid>/status), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def wait_until(
    condition: Callable[[], bool], deadline_s: float, describe: Callable[[], str]
) -> None:
    """Poll `condition` until it holds; fail with `describe()` once `deadline_s` has passed."""
    deadline = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {deadline_s:.0f} s: {describe()}")
        time.sleep(0.1)


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


async def post_json(url: str, path: str, body: object, headers: dict[str, str]) -> Answer:
    """POST one JSON body on a new connection and read the whole answer.

    A load driver that shares two cores with the server must be cheap: this costs a fraction of
    an httpx request (h11 is the HTTP/1.1 state machine httpx and uvicorn use themselves).
    Raises OSError (or h11's errors) when the connection fails."""
    host, _, port = url.removeprefix("http://").partition(":")
    payload = json.dumps(body).encode()
    connection = h11.Connection(h11.CLIENT)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        fields = [
            ("Host", f"{host}:{port}"),
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(payload))),
            ("Connection", "close"),
            *headers.items(),
        ]
        writer.write(connection.send(h11.Request(method="POST", target=path, headers=fields)))
        writer.write(connection.send(h11.Data(data=payload)))
        writer.write(connection.send(h11.EndOfMessage()))
        await writer.drain()
        status, answer_headers, chunks = 0, {}, []
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                connection.receive_data(await reader.read(1 << 16))
            elif isinstance(event, h11.Response):
                status = event.status_code
                answer_headers = {k.decode().lower(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return Answer(status, answer_headers, b"".join(chunks))
    finally:
        writer.close()
