"""Two replicas on Ray Serve (a local Ray with two CPUs, no dashboard) over a PostgreSQL registry
and one prefix store, against the single-process server on the same tiny model.

One application serves the whole module: starting Ray and two replicas takes a while on a
2-core machine. The replica killed in the last test is replaced by Serve.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
from fastapi.testclient import TestClient
from ray import serve

from server.api.app import create_app
from server.config import Settings
from server.models import LoadedModel, load_model
from server.scale.deployments import REPLICA_HEADER, build_app
from server.scale.launch import APP_NAME
from tests.postgres import Cluster
from tests.registry_support import blob_files, native_files
from tests.tiny import make_adapter, save_tiny_model

ADMIN = "replicas-admin-key"
SMALL = {"num_slots": 4, "max_len": 128, "max_new_tokens_limit": 64, "shutdown_grace": 1}
SMALL |= {"max_request_bytes": 64 << 10, "max_upload_bytes": 256 << 10}
SMALL |= {"max_training_file_bytes": 64 << 10}
# Serve learns which replica holds a prefix from a report the replica pushes every 0.1 s; this
# wait lets that report reach the router before the requests that should follow it.
ROUTING_SETTLES_S = 3.0


@dataclass
class World:
    model_dir: Path
    loaded: LoadedModel
    adapters: dict[str, Path]
    store: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("replicas")
    model_dir = save_tiny_model(root / "model")
    loaded = load_model(str(model_dir))  # exactly what each replica loads
    adapters = {}
    for seed, (name, kind, tokens) in enumerate([("pirate", "prefix", 4), ("sailor", "prompt", 5)]):
        adapters[name] = root / name
        make_adapter(loaded.model, kind, tokens, adapters[name], seed=seed + 1)
    return World(model_dir, loaded, adapters, root / "store")


@pytest.fixture(scope="module")
def url(world: World, postgres: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The application's address; Ray and Serve are shut down after the module."""
    database = postgres.create_database()
    settings = Settings(
        model=str(world.model_dir),
        data_dir=tmp_path_factory.mktemp("replica-data"),
        store_dir=world.store,
        database_url=postgres.url(database),
        admin_key=ADMIN,
        replicas=2,
        replica_cpus=0.5,
        file_grace=0,  # files go at once, so the store can be compared with the registry
        **SMALL,
    )
    port = free_port()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=100 << 20,
        log_to_driver=False,
        namespace="prefix-server-tests",
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(settings), name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        postgres.drop_database(database)


@pytest.fixture(scope="module")
def single(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The single-process server on the same model: the reference for every answer."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("single"), admin_key=ADMIN, **SMALL)
    app = create_app(settings, loaded=world.loaded, background_start=False)
    with TestClient(app) as client:
        yield client


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def create_tenant(client: Any, name: str) -> dict[str, str]:
    response = client.post("/v1/tenants", json={"name": name}, headers=bearer(ADMIN))
    assert response.status_code == 201, response.text
    return bearer(response.json()["api_key"])


def upload_files(client: Any, headers: dict[str, str], name: str, files: dict[str, bytes]) -> Any:
    sent = [("files", (file, data)) for file, data in files.items()]
    return client.post("/v1/prefixes", data={"name": name}, files=sent, headers=headers)


def adapter_files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.iterdir()}


Reference = Callable[[list[int], str | None], list[int]]


def generate(client: Any, headers: dict[str, str], prompt: list[int], prefix: str | None) -> Any:
    body = {"prompt": prompt, "prefix": prefix, "max_new_tokens": 8, "temperature": 0}
    return client.post("/v1/generate", json=body, headers=headers)


@pytest.fixture(scope="module")
def http(url: str) -> Iterator[httpx.Client]:
    # The timeout guards against a hang; no test asserts how long anything takes.
    with httpx.Client(base_url=url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def reference_alice(single: TestClient, world: World) -> dict[str, str]:
    """Tenant alice with prefixes pirate and sailor on the reference server."""
    headers = create_tenant(single, "alice")
    for name, folder in world.adapters.items():
        assert upload_files(single, headers, name, adapter_files(folder)).status_code == 201
    return headers


@pytest.fixture(scope="module")
def alice(http: httpx.Client, world: World, reference_alice: dict[str, str]) -> dict[str, str]:
    """The same tenant and prefixes through the replicas."""
    headers = create_tenant(http, "alice")
    for name, folder in world.adapters.items():
        response = upload_files(http, headers, name, adapter_files(folder))
        assert response.status_code == 201, response.text
        assert response.headers[REPLICA_HEADER]
    return headers


@pytest.fixture(scope="module")
def reference(single: TestClient, reference_alice: dict[str, str]) -> Reference:
    """The tokens the single-process server answers alice's request with."""

    def tokens(prompt: list[int], prefix: str | None) -> list[int]:
        response = generate(single, reference_alice, prompt, prefix)
        assert response.status_code == 200, response.text
        return list(response.json()["token_ids"])

    return tokens


def in_parallel(work: Callable[[int], Any], count: int, workers: int = 4) -> list[Any]:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(work, range(count)))


def wait_until(condition: Callable[[], bool], what: str, limit: float = 180) -> None:
    """A guard against hanging, not a timing assertion: the condition must come true."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.5)


def test_answers_equal_the_single_process_server_and_a_prefix_stays_on_one_replica(
    http: httpx.Client, reference: Reference, alice: dict[str, str]
) -> None:
    # The first request for a prefix places it; the rest follow it there.
    first = generate(http, alice, [3, 1, 4], "alice/pirate")
    assert first.status_code == 200, first.text
    time.sleep(ROUTING_SETTLES_S)

    jobs = [([i + 1, 2 * i + 3, 5], "alice/pirate") for i in range(16)]
    jobs += [([i + 2, 7], None) for i in range(8)]
    responses = in_parallel(lambda i: generate(http, alice, *jobs[i]), len(jobs))

    pirate_replicas = Counter()
    for (prompt, prefix), response in zip(jobs, responses, strict=True):
        assert response.status_code == 200, response.text
        assert response.json()["token_ids"] == reference(prompt, prefix)
        if prefix is not None:
            pirate_replicas[response.headers[REPLICA_HEADER]] += 1
    assert list(pirate_replicas.values()) == [16], pirate_replicas
    assert first.headers[REPLICA_HEADER] in pirate_replicas

    # Streams, the OpenAI route and errors go through the replicas unchanged too.
    body = {"prompt": [2, 4, 6], "prefix": "alice/sailor", "max_new_tokens": 6, "temperature": 0}
    streamed = http.post("/v1/generate", json={**body, "stream": True}, headers=alice)
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = [b.removeprefix("data: ") for b in streamed.text.split("\n\n") if b.strip()]
    assert events[-1] == "[DONE]"
    tokens = [t for event in events[:-1] for t in json.loads(event)["token_ids"]]
    assert tokens == reference([2, 4, 6], "alice/sailor")[:6]
    completion = http.post(
        "/v1/completions",
        json={"model": "alice/pirate", "prompt": [5, 6], "max_tokens": 4, "temperature": 0},
        headers=alice,
    )
    assert completion.status_code == 200, completion.text
    missing = http.post("/v1/generate", json={**body, "prefix": "alice/none"}, headers=alice)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"
    unauthorised = http.get("/v1/prefixes", headers=bearer("psk_wrong"))
    assert unauthorised.status_code == 401
    assert all(r.headers[REPLICA_HEADER] for r in (streamed, completion, missing, unauthorised))


def test_metrics_of_every_replica_labelled_by_replica(
    http: httpx.Client, alice: dict[str, str]
) -> None:
    seen = {generate(http, alice, [1, i], None).headers[REPLICA_HEADER] for i in range(12)}

    def labelled() -> set[str]:
        text = http.get("/metrics").text
        lines = [line for line in text.splitlines() if line.startswith("prefix_server_")]
        return {
            part.split('"')[1] for line in lines for part in line.split(",") if "replica=" in part
        }

    wait_until(lambda: seen <= labelled(), f"metrics of {seen}")
    metrics = http.get("/metrics")
    assert "prefix_server_generated_tokens_total" in metrics.text
    assert metrics.headers[REPLICA_HEADER].startswith("router-")  # the router answered it


def test_the_console_is_served_through_the_router(http: httpx.Client) -> None:
    """/console reaches a replica like any route; the operator page's /metrics is the router's
    (every replica's series), which it parses the same way."""
    index = http.get("/console/")
    assert index.status_code == 200 and "<script" in index.text
    assert "default-src 'self'" in index.headers["Content-Security-Policy"]
    assert not index.headers[REPLICA_HEADER].startswith("router-")  # a replica answered
    module = http.get("/console/app.js")
    assert module.status_code == 200
    assert module.headers["Content-Type"].startswith("text/javascript")


def test_bodies_over_the_limits_are_refused_by_the_replica_or_before_it(
    http: httpx.Client, alice: dict[str, str]
) -> None:
    big = {"prompt": "x" * (100 << 10)}  # over --max-request-bytes, under any route's limit
    refused = http.post("/v1/generate", json=big, headers=alice)
    assert refused.status_code == 413 and "request body" in refused.json()["error"]["message"]
    assert not refused.headers[REPLICA_HEADER].startswith("router-")
    huge = {"prompt": "x" * (300 << 10)}  # over every route's: never held by the router
    refused = http.post("/v1/generate", json=huge, headers=alice)
    assert refused.status_code == 413 and "262144 bytes" in refused.json()["error"]["message"]
    assert refused.headers[REPLICA_HEADER].startswith("router-")


def test_uploads_and_deletes_on_both_replicas_leave_the_registry_consistent(
    http: httpx.Client, world: World
) -> None:
    bob = create_tenant(http, "bob")
    spec = world.loaded.spec
    shared = native_files(spec, 3, seed=100)  # the same bytes under several names: one file
    served_by: set[str] = set()
    lock = threading.Lock()

    def churn(worker: int) -> set[str]:
        """Upload, use and delete; return the names this worker leaves live."""
        kept = set()
        for step in range(4):
            name = f"w{worker}-{step}"
            files = shared if step % 2 else native_files(spec, 2, seed=10 * worker + step)
            response = upload_files(http, bob, name, files)
            assert response.status_code == 201, response.text
            used = generate(http, bob, [1, 2], f"bob/{name}")
            assert used.status_code == 200, used.text
            with lock:
                served_by.update({response.headers[REPLICA_HEADER], used.headers[REPLICA_HEADER]})
            if step % 3 == 0 or worker % 2:
                deleted = http.delete(f"/v1/prefixes/bob/{name}", headers=bob)
                assert deleted.status_code == 204, deleted.text
                assert generate(http, bob, [1, 2], f"bob/{name}").status_code == 404
            else:
                kept.add(f"bob/{name}")
        return kept

    expected = set().union(*in_parallel(churn, 6, workers=6))
    assert len(served_by) == 2  # both replicas wrote to the registry

    listed = http.get("/v1/prefixes", params={"scope": "own", "limit": 100}, headers=bob).json()
    assert {p["id"] for p in listed["data"]} == expected
    live = {p["sha256"] for p in listed["data"]}
    for prefix in expected:  # every listed prefix is servable, whichever replica gets it
        assert generate(http, bob, [3], prefix).status_code == 200
    # Each prefix keeps two files (compiled KV and parameters); alice's two prefixes' four stay
    # too; every file of a deleted prefix goes (the last release may collect it just after the
    # delete answered).
    wait_until(
        lambda: (
            live <= blob_files(world.store) and len(blob_files(world.store)) == 2 * len(live) + 4
        ),
        "the store holds exactly the live prefixes' files",
    )


def test_one_name_created_at_once_on_both_replicas_has_one_winner(
    http: httpx.Client, world: World
) -> None:
    def create(_: int) -> httpx.Response:
        return http.post("/v1/tenants", json={"name": "carol"}, headers=bearer(ADMIN))

    tenants = in_parallel(create, 8, workers=8)
    assert sorted(r.status_code for r in tenants) == [201] + [409] * 7, [r.text for r in tenants]
    carol = bearer(next(r for r in tenants if r.status_code == 201).json()["api_key"])

    def upload(seed: int) -> httpx.Response:
        return upload_files(http, carol, "same", native_files(world.loaded.spec, 2, seed=seed))

    uploads = in_parallel(upload, 8, workers=8)
    assert sorted(r.status_code for r in uploads) == [201] + [409] * 7, [r.text for r in uploads]
    conflicts = [r for r in tenants + uploads if r.status_code == 409]
    assert {r.json()["error"]["type"] for r in conflicts} == {"conflict"}
    assert len({r.headers[REPLICA_HEADER] for r in tenants + uploads}) == 2


def test_a_killed_replica_is_replaced_and_the_other_keeps_answering(
    http: httpx.Client, reference: Reference, alice: dict[str, str]
) -> None:
    victim = generate(http, alice, [3, 1, 4], "alice/pirate").headers[REPLICA_HEADER]
    body = {"prompt": [7, 7], "prefix": "alice/pirate", "max_new_tokens": 60, "temperature": 0}
    body |= {"ignore_eos": True, "stream": True}
    started = threading.Barrier(5)
    outcomes: list[str] = []

    def stream(_: int) -> None:
        with http.stream("POST", "/v1/generate", json=body, headers=alice) as response:
            if response.status_code != 200:  # refused once the replica is gone: a clean error
                response.read()
                assert response.json()["error"]["type"] == "unavailable"
                outcomes.append("refused")
                started.wait(timeout=120)
                return
            lines = response.iter_lines()
            first = next(line for line in lines if line)
            started.wait(timeout=120)
            events = [first] + [line for line in lines if line]
        assert events[-1] == "data: [DONE]", events[-3:]
        last = json.loads(events[-2].removeprefix("data: "))
        outcomes.append("failed" if "error" in last else last["finish_reason"])

    with ThreadPoolExecutor(4) as pool:
        running = [pool.submit(stream, i) for i in range(4)]
        started.wait(timeout=120)  # every stream has its first event: in flight on the victim
        ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP_NAME}#Replica#{victim}", namespace="serve"))
        for future in running:
            future.result(timeout=120)  # ended, one way or the other: none hangs
    assert set(outcomes) <= {"length", "failed", "refused"}, outcomes

    # The other replica answers at once; a request routed to the dead one is a clean 503.
    after = [generate(http, alice, [9, i], "alice/pirate") for i in range(6)]
    assert all(r.status_code in (200, 503) for r in after), [r.text for r in after]
    assert after[-1].status_code == 200 and after[-1].headers[REPLICA_HEADER] != victim
    assert after[-1].json()["token_ids"] == reference([9, 5], "alice/pirate")

    # Serve replaces the dead replica; the newcomer serves the same answers.
    replicas: set[str] = set()

    def replaced() -> bool:
        response = generate(http, alice, [4, 4], None)
        assert response.status_code in (200, 503), response.text
        if response.status_code == 200:
            assert response.json()["token_ids"] == reference([4, 4], None)
            replicas.add(response.headers[REPLICA_HEADER])
        return len(replicas - {victim, after[-1].headers[REPLICA_HEADER]}) > 0

    wait_until(replaced, "a replacement replica answering")
