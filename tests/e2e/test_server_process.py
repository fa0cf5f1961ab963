"""A real `prefix-server serve` process on 127.0.0.1, driven by the official openai client and
by concurrent httpx requests from two tenants; then killed and restarted on the same data."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from prefixes import read_upload
from server.engine.llm import LLM
from server.engine.request import Request, SamplingParams
from server.models import LoadedModel, load_model
from tests.tiny import make_adapter, save_tiny_model

ADMIN = "e2e-admin-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.process.send_signal(sig)
        return self.process.wait(timeout=60)


def start_server(model: Path, data_dir: Path, log: Path) -> Server:
    port = free_port()
    command = [
        sys.executable, "-m", "server.cli", "serve", "--model", str(model),
        "--data-dir", str(data_dir), "--port", str(port), "--admin-key", ADMIN,
        "--num-slots", "4", "--max-len", "128", "--shutdown-grace", "2",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    process = subprocess.Popen(command, stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env)
    server = Server(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + 300  # generous: a loaded 2-core CI machine imports slowly
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited: {log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{server.url}/health", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise AssertionError(f"server never became healthy: {log.read_text()[-3000:]}")


@dataclass
class World:
    model_dir: Path
    data_dir: Path
    loaded: LoadedModel
    adapters: dict[str, Path]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("e2e")
    model_dir = save_tiny_model(root / "model")
    loaded = load_model(str(model_dir))
    adapters = {
        "pirate": root / "pirate",  # alice's prefix tuning
        "poet": root / "poet",  # bob's prompt tuning
    }
    make_adapter(loaded.model, "prefix", 6, adapters["pirate"], seed=1)
    make_adapter(loaded.model, "prompt", 4, adapters["poet"], seed=2)
    return World(model_dir, root / "data", loaded, adapters)


def reference(world: World, prompt: list[int], adapter: str | None, n: int) -> list[int]:
    llm = LLM(world.loaded, num_slots=1, max_len=128)
    prefix = None
    if adapter:
        files = {p.name: p.read_bytes() for p in world.adapters[adapter].iterdir() if p.is_file()}
        prefix = llm.compile(read_upload(files))
    sampling = SamplingParams(max_new_tokens=n, temperature=0)
    (request,) = llm.generate([Request(prompt, sampling, prefix)])
    return request.output_token_ids


def create_tenant(server: Server, name: str) -> str:
    response = httpx.post(
        f"{server.url}/v1/tenants",
        json={"name": name},
        headers={"Authorization": f"Bearer {ADMIN}"},
    )
    assert response.status_code == 201, response.text
    return str(response.json()["api_key"])


def upload(server: Server, key: str, name: str, folder: Path) -> None:
    files = [("files", (p.name, p.read_bytes())) for p in folder.iterdir() if p.suffix != ".md"]
    response = httpx.post(
        f"{server.url}/v1/prefixes",
        data={"name": name},
        files=files,
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )
    assert response.status_code == 201, response.text


@pytest.fixture(scope="module")
def running(world: World) -> Iterator[tuple[Server, dict[str, str]]]:
    server = start_server(world.model_dir, world.data_dir, world.data_dir.parent / "server.log")
    keys = {"alice": create_tenant(server, "alice"), "bob": create_tenant(server, "bob")}
    upload(server, keys["alice"], "pirate", world.adapters["pirate"])
    upload(server, keys["bob"], "poet", world.adapters["poet"])
    yield server, keys
    if server.process.poll() is None:
        server.process.kill()
        server.process.wait()


def test_openai_client_works_unchanged(
    world: World, running: tuple[Server, dict[str, str]]
) -> None:
    server, keys = running
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=keys["alice"])
    tokenizer = world.loaded.tokenizer
    expected = tokenizer.decode(reference(world, [3, 14, 15, 92], "pirate", 6))  # type: ignore[union-attr]

    models = {m.id for m in client.models.list().data}
    assert models == {world.loaded.model_id, "alice/pirate"}  # not bob's private prefix

    completion = client.completions.create(
        model="alice/pirate", prompt="w3 w14 w15 w92", max_tokens=6, temperature=0
    )
    assert completion.choices[0].text == expected
    assert completion.usage is not None and completion.usage.completion_tokens == 6

    streamed = client.completions.create(
        model="alice/pirate", prompt="w3 w14 w15 w92", max_tokens=6, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in streamed) == expected

    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="bob/poet", prompt="w1", max_tokens=2)


def test_concurrent_tenants_get_the_tokens_they_get_alone(
    world: World, running: tuple[Server, dict[str, str]]
) -> None:
    server, keys = running
    jobs = [
        ("alice" if i % 2 == 0 else "bob", [i + 1, 2 * i + 5, 7][: 1 + i % 3], i % 3)
        for i in range(10)
    ]
    adapters = {"alice": "pirate", "bob": "poet"}

    async def one(
        client: httpx.AsyncClient, tenant: str, prompt: list[int], mode: int
    ) -> list[int]:
        body = {
            "prompt": prompt,
            "prefix": None if mode == 2 else adapters[tenant],
            "max_new_tokens": 5,
            "temperature": 0,
        }
        response = await client.post(
            "/v1/generate", json=body, headers={"Authorization": f"Bearer {keys[tenant]}"}
        )
        assert response.status_code == 200, response.text
        return list(response.json()["token_ids"])

    async def main() -> list[list[int]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            return await asyncio.gather(*(one(client, *job) for job in jobs))

    results = asyncio.run(main())
    for (tenant, prompt, mode), tokens in zip(jobs, results, strict=True):
        adapter = None if mode == 2 else adapters[tenant]
        assert tokens == reference(world, prompt, adapter, 5), (tenant, prompt, mode)


def test_cli_tenant_create_offline_and_upload_to_the_server(
    world: World, running: tuple[Server, dict[str, str]], tmp_path: Path
) -> None:
    server, keys = running
    from server.cli import main

    command = [sys.executable, "-m", "server.cli", "tenant", "create", "dave"]
    command += ["--data-dir", str(tmp_path)]
    created = subprocess.run(command, capture_output=True, text=True, check=True)
    assert created.stdout.startswith("tenant: dave\napi_key: psk_")
    again = subprocess.run(command, capture_output=True, text=True)
    assert again.returncode == 1 and "already exists" in again.stderr

    argv = ["upload", str(world.adapters["pirate"]), "--name", "via-cli", "--url", server.url]
    assert main([*argv, "--api-key", keys["alice"]]) == 0
    listed = httpx.get(
        f"{server.url}/v1/prefixes", headers={"Authorization": f"Bearer {keys['alice']}"}
    )
    assert "alice/via-cli" in {p["id"] for p in listed.json()["data"]}
    assert main([*argv, "--api-key", keys["alice"]]) == 1  # the name is taken: 409
    assert main([*argv, "--api-key", "psk_wrong"]) == 1


def cancelled_count(server: Server) -> float:
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith('prefix_server_requests_finished_total{reason="cancelled"}'):
            return float(line.split()[-1])
    return 0.0


def test_a_client_that_disconnects_mid_stream_cancels_its_request(
    running: tuple[Server, dict[str, str]],
) -> None:
    server, keys = running
    before = cancelled_count(server)
    body = {"prompt": [1, 2], "max_new_tokens": 120, "temperature": 0, "stream": True}
    headers = {"Authorization": f"Bearer {keys['bob']}"}
    with httpx.stream("POST", f"{server.url}/v1/generate", json=body, headers=headers) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                break  # leave after the first event: the connection closes
    deadline = time.monotonic() + 10
    while cancelled_count(server) == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cancelled_count(server) == before + 1


def test_each_request_is_logged_once_as_json(running: tuple[Server, dict[str, str]]) -> None:
    server, _ = running
    request_id = "log-once-7d2f"
    assert (
        httpx.get(f"{server.url}/health", headers={"X-Request-ID": request_id}).status_code == 200
    )
    deadline = time.monotonic() + 10  # the line is written once the response has gone

    def logged() -> list[str]:
        return [line for line in server.log.read_text().splitlines() if request_id in line]

    while not logged() and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = logged()
    assert len(lines) == 1 and json.loads(lines[0][lines[0].index("{") :])["status"] == 200
    assert '"GET /health HTTP/1.1"' not in server.log.read_text()  # uvicorn's access line


def test_prefixes_and_keys_survive_sigkill(
    world: World, running: tuple[Server, dict[str, str]]
) -> None:
    server, keys = running
    body = {"prompt": [9, 8, 7], "prefix": "alice/pirate", "max_new_tokens": 5, "temperature": 0}
    headers = {"Authorization": f"Bearer {keys['alice']}"}
    before = httpx.post(f"{server.url}/v1/generate", json=body, headers=headers).json()

    server.stop(signal.SIGKILL)
    restarted = start_server(world.model_dir, world.data_dir, server.log)
    try:
        after = httpx.post(f"{restarted.url}/v1/generate", json=body, headers=headers)
        assert after.status_code == 200, after.text
        assert (
            after.json()["token_ids"]
            == before["token_ids"]
            == reference(world, [9, 8, 7], "pirate", 5)
        )
        listed = httpx.get(f"{restarted.url}/v1/prefixes", headers=headers).json()["data"]
        assert "alice/pirate" in [p["id"] for p in listed]
    finally:
        # uvicorn finishes its graceful shutdown, then re-raises the signal it caught.
        assert restarted.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in restarted.log.read_text()


def test_sigterm_lets_a_running_request_finish(world: World, tmp_path: Path) -> None:
    server = start_server(world.model_dir, tmp_path / "data", tmp_path / "server.log")
    try:
        key = create_tenant(server, "carol")
        body = {"prompt": [5, 6], "max_new_tokens": 100, "temperature": 0, "stream": True}
        events = []
        with httpx.stream(
            "POST", f"{server.url}/v1/generate", json=body, timeout=60,
            headers={"Authorization": f"Bearer {key}"},
        ) as response:  # fmt: skip
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line.removeprefix("data: "))
                    if len(events) == 1:
                        server.process.send_signal(signal.SIGTERM)
        assert events[-1] == "[DONE]"
        assert '"finish_reason": "length"' in events[-2]  # all 100 tokens, not cancelled
        assert server.process.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        if server.process.poll() is None:
            server.process.kill()
