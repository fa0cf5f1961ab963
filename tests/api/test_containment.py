"""One tenant's hostile request fails alone, with a 4xx naming the problem, while another tenant's
concurrent request gets exactly its own tokens: bounds on every field, tokenizer errors, body
limits before authentication, per-tenant queue and pin budgets, all-or-nothing multi-prompt calls,
bounded metric labels, huge integers in adapters, overwrites that keep visibility."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.models import LoadedModel, wrap_model
from tests.api.conftest import (
    ADMIN_KEY,
    CONFIG,
    WEIGHTS,
    MakeClient,
    StalledEngine,
    TenantAuth,
    alone,
    app_settings,
    assert_error,
    bearer,
    create_tenant,
    in_background,
    peft_files,
    upload,
    wait_for,
)
from tests.tiny import word_tokenizer

VICTIM = {"prompt": [1, 2, 3], "max_new_tokens": 6, "temperature": 0, "ignore_eos": True}
BASE = "tiny-llama"

# (route, body, field named in the error, status)
# fmt: off
BOUNDS = [
    ("/v1/generate", {"prompt": [1], "top_k": 385}, "top_k", 422),  # vocabulary is 384
    ("/v1/generate", {"prompt": [1], "top_k": 2**63}, "top_k", 422),
    ("/v1/generate", {"prompt": [1], "temperature": 1e-30}, "temperature", 422),
    ("/v1/generate", {"prompt": [1], "temperature": 1e-3}, "temperature", 422),
    ("/v1/generate", {"prompt": [1], "stop": ["x" * 257]}, "stop", 422),
    ("/v1/generate", {"prompt": [1], "stop": ["x"] * 17}, "stop", 422),
    ("/v1/generate", {"prompt": [1], "seed": 2**64}, "seed", 422),
    ("/v1/generate", {"prompt": [1], "max_new_tokens": 10**30}, "max_new_tokens", 422),
    ("/v1/completions", {"model": BASE, "prompt": [[1]] * 17}, "prompt", 422),
    ("/v1/completions", {"model": BASE, "prompt": [1], "top_k": 10**9}, "top_k", 422),
    ("/v1/completions", {"model": BASE, "prompt": [1], "logit_bias": {"384": 5}}, "logit_bias",
     400),  # vocabulary is 384
    ("/v1/completions", {"model": BASE, "prompt": [1], "logit_bias": {"1": 101}}, "logit_bias",
     422),
    ("/v1/completions", {"model": BASE, "prompt": [1], "suffix": "x"}, "suffix", 400),
    ("/v1/completions", {"model": BASE, "prompt": [1], "stream_options": {}}, "stream_options",
     400),
]
# fmt: on


@pytest.fixture
def pair(make_client: MakeClient) -> Iterator[tuple[TestClient, TenantAuth, TenantAuth]]:
    with make_client(num_slots=2) as client:
        yield client, create_tenant(client, "alice"), create_tenant(client, "mallory")


def victim_and(
    client: TestClient,
    alice: TenantAuth,
    hostile: tuple[str, dict[str, Any], TenantAuth],
    loaded: LoadedModel,
) -> Any:
    """Alice's request runs while mallory's hostile one is sent; hers must be exact."""
    route, body, who = hostile
    with in_background(client, "/v1/generate", VICTIM, alice.headers) as victim:
        response = client.post(route, json=body, headers=who.headers)
    assert victim["response"].status_code == 200, victim["response"].text
    assert victim["response"].json()["token_ids"] == alone(loaded, [1, 2, 3], None, 6)
    return response


@pytest.mark.parametrize(("route", "body", "field", "status"), BOUNDS)
def test_every_field_is_bounded_and_a_violation_fails_only_its_request(
    pair: tuple[TestClient, TenantAuth, TenantAuth],
    loaded: LoadedModel,
    route: str,
    body: dict[str, Any],
    field: str,
    status: int,
) -> None:
    client, alice, mallory = pair
    response = victim_and(client, alice, (route, body, mallory), loaded)
    assert_error(response, status, field)


def test_fields_that_change_nothing_are_accepted(
    client: TestClient, new_tenant: Any, loaded: LoadedModel
) -> None:
    alice = new_tenant("alice")
    body = {"model": BASE, "prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0, "user": "u1",
            "metadata": {"k": "v"}}  # fmt: skip
    response = client.post("/v1/completions", json=body, headers=alice.headers)
    assert response.status_code == 200, response.text


@pytest.fixture
def worded(loaded: LoadedModel, make_client: MakeClient) -> Iterator[TestClient]:
    with make_client(model=wrap_model(loaded.model, word_tokenizer(), BASE)) as client:
        yield client


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/v1/generate", {"prompt": "w1 a\ud800", "max_new_tokens": 2}),
        ("/v1/completions", {"model": BASE, "prompt": "w1 a\ud800", "max_tokens": 2}),
        ("/v1/completions", {"model": BASE, "prompt": ["w1", "a\ud800"], "max_tokens": 2}),
    ],
)
def test_text_the_tokenizer_cannot_take_is_400(
    worded: TestClient, loaded: LoadedModel, route: str, body: dict[str, Any]
) -> None:
    alice, mallory = create_tenant(worded, "alice"), create_tenant(worded, "mallory")
    raw = json.dumps(body).encode()  # json.dumps escapes the lone surrogate as \\ud800
    with in_background(worded, "/v1/generate", VICTIM, alice.headers) as victim:
        response = worded.post(
            route, content=raw, headers={**mallory.headers, "content-type": "application/json"}
        )
    assert_error(response, 400, "prompt", "tokenized")
    assert victim["response"].json()["token_ids"] == alone(loaded, [1, 2, 3], None, 6)


def test_a_body_over_the_limit_is_413_before_authentication(make_client: MakeClient) -> None:
    with make_client(max_request_bytes=4096) as client:
        big = {"prompt": "w" * 10_000}
        no_key = client.post("/v1/generate", json=big)
        assert_error(no_key, 413, "4096")  # not 401: the size is checked first
        chunked = client.post(
            "/v1/generate",
            content=iter([b'{"prompt": "', b"w" * 5000, b'"}']),
            headers={**bearer("psk_nobody"), "content-type": "application/json"},
        )
        assert_error(chunked, 413, "4096")
        small = client.post("/v1/tenants", json={"name": "bob"}, headers=bearer(ADMIN_KEY))
        assert small.status_code == 201  # within the limit, the server goes on as usual


@pytest.fixture
def live_server(loaded: LoadedModel, tmp_path: Path) -> Iterator[str]:
    """The app on a real socket (uvicorn on a thread): what real clients see."""
    settings = app_settings(tmp_path / "data", max_upload_bytes=4096, max_request_bytes=4096)
    app = create_app(settings, loaded=loaded, background_start=False)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, "the server to start")
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.mark.parametrize("size", [5_000, 300_000])
def test_urllib_reads_the_413_of_an_upload_over_the_limit(live_server: str, size: int) -> None:
    """The server drains what the client is still sending, so it sees the JSON error, not a
    reset connection."""
    boundary = "b0undary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; '
            f'filename="p.safetensors"\r\n\r\n'
        ).encode()
        + b"\0" * size
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        f"{live_server}/v1/prefixes",
        data=body,
        method="POST",
        headers={
            "Authorization": "Bearer psk_nobody",
            "Content-Type": f"multipart/form-data; boundary={boundary}",
        },
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 413
    error = json.loads(caught.value.read())["error"]
    assert error["type"] == "payload_too_large" and "4096" in error["message"]


def test_a_flooding_tenant_gets_429_and_another_tenant_still_gets_in(
    make_client: MakeClient, loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    with make_client(num_slots=1, max_waiting=10, max_waiting_per_tenant=2) as client:
        stalled = StalledEngine(client.app.state.services.engine, monkeypatch)  # type: ignore[attr-defined]
        alice, mallory = create_tenant(client, "alice"), create_tenant(client, "mallory")
        flood = {"prompt": [4, 5], "max_new_tokens": 2, "temperature": 0}
        try:
            with in_background(client, "/v1/generate", flood, mallory.headers):
                # The first is running (held) before the next two queue: they fill her share
                # whatever the timing, and the fourth is refused.
                wait_for(stalled.stepping.is_set, "mallory's first request to run")
                with (
                    in_background(client, "/v1/generate", flood, mallory.headers),
                    in_background(client, "/v1/generate", flood, mallory.headers),
                ):
                    wait_for(lambda: stalled.waiting == 2, "the flood")
                    refused = client.post("/v1/generate", json=flood, headers=mallory.headers)
                    with in_background(client, "/v1/generate", VICTIM, alice.headers) as victim:
                        wait_for(lambda: stalled.waiting == 3, "alice's request to queue")
                        stalled.go()
        finally:
            stalled.go()
    assert_error(refused, 429, "mallory")
    assert refused.headers["retry-after"]
    assert victim["response"].status_code == 200, victim["response"].text
    assert victim["response"].json()["token_ids"] == alone(loaded, [1, 2, 3], None, 6)


def test_a_refused_prompt_of_a_multi_prompt_call_cancels_the_ones_started(
    make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    with make_client(num_slots=1) as client:
        engine = client.app.state.services.engine  # type: ignore[attr-defined]
        stalled = StalledEngine(engine, monkeypatch)
        mallory = create_tenant(client, "mallory")
        # The third prompt is refused at submit (outside the vocabulary), whatever the engine
        # has admitted by then; the first two are already queued or running.
        body = {"model": BASE, "prompt": [[1], [2], [999_999]], "max_tokens": 50}
        try:
            response = client.post("/v1/completions", json=body, headers=mallory.headers)
        finally:
            stalled.go()
        assert_error(response, 400, "prompt", "999999")
        wait_for(lambda: engine.in_flight == 0, "the started prompts to be cancelled")
        assert engine.metrics.requests_finished["cancelled"] == 2
        assert engine.metrics.generated_tokens <= 2  # at most the step already under way


def test_a_tenant_cannot_pin_more_than_its_share_of_the_pool(
    make_client: MakeClient,
    loaded: LoadedModel,
    adapters: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each tiny prefix compiles to a few KiB; a quarter of 16 KiB holds one, not two.
    with make_client(num_slots=1, device_pool_bytes=16384, max_waiting=10) as client:
        stalled = StalledEngine(client.app.state.services.engine, monkeypatch)  # type: ignore[attr-defined]
        alice, mallory = create_tenant(client, "alice"), create_tenant(client, "mallory")
        for who, name, kind in [(mallory, "a", "prefix"), (mallory, "b", "prompt"),
                                (alice, "own", "p_tuning")]:  # fmt: skip
            assert upload(client, who, peft_files(adapters[kind]), name=name).status_code == 201
        own, a, b = ({**VICTIM, "prefix": name} for name in ("own", "a", "b"))
        try:
            with in_background(client, "/v1/generate", a, mallory.headers):
                wait_for(stalled.stepping.is_set, "mallory's first request to run")
                # the same version again: it counts once, so the second one queues
                with in_background(client, "/v1/generate", a, mallory.headers) as again:
                    wait_for(lambda: stalled.waiting == 1, "mallory's second request")
                    registry = client.app.state.services.registry  # type: ignore[attr-defined]
                    loads_before = registry.stats().loads
                    refused = client.post("/v1/generate", json=b, headers=mallory.headers)
                    # refused before its prefix was loaded: nothing of anyone's was evicted for it
                    assert registry.stats().loads == loads_before
                    with in_background(client, "/v1/generate", own, alice.headers) as victim:
                        wait_for(lambda: stalled.waiting == 2, "alice's request")
                        stalled.go()
        finally:
            stalled.go()
    assert_error(refused, 429, "mallory", "pin")
    assert again["response"].status_code == 200, again["response"].text
    assert victim["response"].status_code == 200, victim["response"].text
    expected = alone(loaded, [1, 2, 3], peft_files(adapters["p_tuning"]), 6)
    assert victim["response"].json()["token_ids"] == expected


def test_an_unknown_method_is_counted_as_other(client: TestClient) -> None:
    for method in ("FOO", "BAR-1", "X" * 50):
        client.request(method, "/health")
    metrics = client.get("/metrics").text
    assert 'method="other"' in metrics
    assert "FOO" not in metrics and "BAR-1" not in metrics


def test_metrics_show_no_tenant_names(client: TestClient, new_tenant: Any) -> None:
    new_tenant("secretcorp")
    assert "secretcorp" not in client.get("/metrics").text


@pytest.mark.parametrize("value", ["9" * 5000, str(10**30), "1e400"])
def test_huge_numbers_in_adapter_config_are_422(
    client: TestClient, new_tenant: Any, adapters: dict[str, Path], value: str
) -> None:
    alice = new_tenant("alice")
    config = (adapters["prefix"] / CONFIG).read_text()
    config = config.replace('"num_virtual_tokens": 4', f'"num_virtual_tokens": {value}')
    files = [
        ("files", (CONFIG, config.encode())),
        ("files", (WEIGHTS, (adapters["prefix"] / WEIGHTS).read_bytes())),
    ]
    assert_error(upload(client, alice, files, name="huge"), 422, CONFIG)


def test_an_overwrite_without_visibility_keeps_it(
    client: TestClient, new_tenant: Any, adapters: dict[str, Path]
) -> None:
    alice = new_tenant("alice")
    first = upload(client, alice, peft_files(adapters["prompt"]), name="p", visibility="public")
    assert first.json()["visibility"] == "public"
    again = upload(client, alice, peft_files(adapters["prefix"]), name="p", overwrite="true")
    assert again.status_code == 201, again.text
    assert (again.json()["version"], again.json()["visibility"]) == (2, "public")
    private = upload(
        client, alice, peft_files(adapters["prompt"]), name="p", overwrite="true",
        visibility="private",
    )  # fmt: skip
    assert private.json()["visibility"] == "private"


def test_a_client_that_expects_100_continue_gets_the_413_before_sending(
    live_server: str,
) -> None:
    """Asked `Expect: 100-continue` with a length over the limit, the server answers 413 at once
    instead of inviting the client to send megabytes it would throw away."""
    host, port = live_server.removeprefix("http://").split(":")
    head = (
        "POST /v1/prefixes HTTP/1.1\r\n"
        f"Host: {host}\r\n"
        "Content-Type: multipart/form-data; boundary=b\r\n"
        "Content-Length: 10000000\r\n"
        "Expect: 100-continue\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(head.encode())
        # The head and the body may arrive in separate packets: parse the response, don't recv once.
        response = http.client.HTTPResponse(connection)
        response.begin()
        body = response.read()
    assert response.status == 413, body[:200]
    assert json.loads(body)["error"]["type"] == "payload_too_large"


def test_every_answer_carries_the_request_id_and_is_counted(make_client: MakeClient) -> None:
    """The body limit's early 413 and a bug's 500 too: both pass through the access log."""
    with make_client(max_request_bytes=4096) as client:

        @client.app.get("/boom")  # type: ignore[attr-defined]
        async def boom() -> None:
            raise RuntimeError("a bug")

        too_big = client.post(
            "/v1/generate", content=b"x" * 5000, headers={"x-request-id": "big-1"}
        )
        assert_error(too_big, 413, "4096")
        assert too_big.headers["x-request-id"] == "big-1"
        crashed = client.get("/boom", headers={"x-request-id": "boom-1"})
        assert_error(crashed, 500, "internal")
        assert crashed.headers["x-request-id"] == "boom-1"
        metrics = client.get("/metrics").text
    assert 'status="413"' in metrics and 'status="500"' in metrics
