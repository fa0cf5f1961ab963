"""Generation endpoints (native and OpenAI), isolation between tenants, and operations."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from prefixes import read_upload
from server.engine.llm import LLM
from server.engine.request import Request, SamplingParams
from server.engine.scheduler import Overloaded
from server.models import LoadedModel
from tests.api.conftest import assert_error, auth, make_client, peft_files

Tenant = Callable[[], tuple[str, dict[str, str]]]


def alone(loaded: LoadedModel, prompt: list[int], folder: Path | None, n: int) -> list[int]:
    llm = LLM(loaded, num_slots=1, max_len=128)
    prefix = None
    if folder is not None:
        prefix = llm.compile(read_upload(dict(f[1] for f in peft_files(folder))))
    sampling = SamplingParams(max_new_tokens=n, temperature=0)
    (request,) = llm.generate([Request(prompt, sampling, prefix)])
    return request.output_token_ids


@pytest.fixture
def owner_with_prefix(
    client: TestClient, tenant: Tenant, adapters: dict[str, Path]
) -> tuple[str, dict[str, str]]:
    owner, headers = tenant()
    files = peft_files(adapters["prompt"])
    response = client.post("/v1/prefixes", data={"name": "style"}, files=files, headers=headers)
    assert response.status_code == 201
    return owner, headers


def sse_events(text: str) -> list:
    events = [
        line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")
    ]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


# Native generation -------------------------------------------------------------------------


def test_generate_matches_the_engine_alone(
    client: TestClient, owner_with_prefix: tuple[str, dict[str, str]],
    loaded: LoadedModel, adapters: dict[str, Path],
) -> None:  # fmt: skip
    owner, headers = owner_with_prefix
    body = {"prompt": [5, 6, 7], "prefix": f"{owner}/style", "max_new_tokens": 6, "temperature": 0}
    response = client.post("/v1/generate", json=body, headers=headers)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["token_ids"] == alone(loaded, [5, 6, 7], adapters["prompt"], 6)
    assert result["finish_reason"] == "length"
    assert result["usage"] == {
        "prompt_tokens": 3, "completion_tokens": 6, "prefix_tokens": 6, "total_tokens": 9,
    }  # fmt: skip
    plain = client.post("/v1/generate", json={**body, "prefix": None}, headers=headers).json()
    assert plain["token_ids"] == alone(loaded, [5, 6, 7], None, 6) != result["token_ids"]

    streamed = client.post("/v1/generate", json={**body, "stream": True}, headers=headers)
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = sse_events(streamed.text)
    assert [t for e in events for t in e["token_ids"]] == result["token_ids"]
    assert events[-1]["finish_reason"] == "length" and events[-1]["usage"]["completion_tokens"] == 6


@pytest.mark.parametrize(
    ("change", "status", "field"),
    [
        ({"temperature": -1}, 422, "temperature"),
        ({"top_p": 0}, 422, "top_p"),
        ({"top_p": 1.5}, 422, "top_p"),
        ({"top_k": -1}, 422, "top_k"),
        ({"max_new_tokens": 0}, 422, "max_new_tokens"),
        ({"max_new_tokens": 65}, 400, "max_new_tokens"),
        ({"prompt": [1, 384]}, 400, "token ids"),
        ({"prompt": [-1]}, 422, "prompt"),
        ({"prompt": [1] * 128}, 400, "prompt"),
        ({"prompt": []}, 400, "prompt"),
        ({"prompt": "some text"}, 400, "tokenizer"),
        ({"stop": [""]}, 422, "stop"),
        ({"unknown": 1}, 422, "unknown"),
        ({"prefix": "../etc"}, 422, "prefix"),
    ],
)
def test_invalid_generation_requests(
    client: TestClient, tenant: Tenant, change: dict, status: int, field: str
) -> None:
    _, headers = tenant()
    body = {"prompt": [1, 2], "max_new_tokens": 2, **change}
    error = assert_error(client.post("/v1/generate", json=body, headers=headers), status)
    assert field in json.dumps(error)


def test_malformed_json_names_the_body(client: TestClient, tenant: Tenant) -> None:
    _, headers = tenant()
    response = client.post(
        "/v1/generate", content=b"{oops", headers={**headers, "content-type": "application/json"}
    )
    assert assert_error(response, 422, "malformed JSON")["details"][0]["field"] == "body"


# OpenAI-compatible --------------------------------------------------------------------------


def test_completions_with_the_base_model_and_with_a_prefix(
    client: TestClient, owner_with_prefix: tuple[str, dict[str, str]], loaded: LoadedModel
) -> None:
    owner, headers = owner_with_prefix
    for model in (loaded.model_id, f"{owner}/style", "style"):
        body = {"model": model, "prompt": [3, 4], "max_tokens": 4, "temperature": 0}
        response = client.post("/v1/completions", json=body, headers=headers)
        assert response.status_code == 200, response.text
        result = response.json()
        assert result["object"] == "text_completion" and result["model"] == model
        assert result["choices"][0]["finish_reason"] == "length"
        assert result["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}
        streamed = client.post("/v1/completions", json={**body, "stream": True}, headers=headers)
        events = sse_events(streamed.text)
        assert events[-1]["choices"][0]["finish_reason"] == "length"
    batch = {"model": loaded.model_id, "prompt": [[1, 2], [3]], "max_tokens": 2, "temperature": 0}
    choices = client.post("/v1/completions", json=batch, headers=headers).json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]


@pytest.mark.parametrize(
    ("change", "status", "word"),
    [
        ({"n": 2}, 400, "n"),
        ({"logprobs": 3}, 400, "logprobs"),
        ({"echo": True}, 400, "echo"),
        ({"model": "nobody/nothing"}, 404, "not found"),
        ({"prompt": []}, 400, "prompt"),
    ],
)
def test_completions_refusals(
    client: TestClient, tenant: Tenant, loaded: LoadedModel, change: dict, status: int, word: str
) -> None:
    _, headers = tenant()
    body = {"model": loaded.model_id, "prompt": [1], "max_tokens": 2, **change}
    assert_error(client.post("/v1/completions", json=body, headers=headers), status, word)


def test_chat_needs_a_chat_template(
    client: TestClient, tenant: Tenant, loaded: LoadedModel
) -> None:
    _, headers = tenant()
    body = {"model": loaded.model_id, "messages": [{"role": "user", "content": "hi"}]}
    assert_error(
        client.post("/v1/chat/completions", json=body, headers=headers), 400, "chat template"
    )


# Isolation ----------------------------------------------------------------------------------


V1_CALLS = [
    ("GET", "/v1/prefixes", None),
    ("GET", "/v1/prefixes/a/b", None),
    ("DELETE", "/v1/prefixes/a/b", None),
    ("POST", "/v1/generate", {"prompt": [1]}),
    ("POST", "/v1/completions", {"model": "m", "prompt": [1]}),
    (
        "POST",
        "/v1/chat/completions",
        {"model": "m", "messages": [{"role": "user", "content": "x"}]},
    ),
    ("GET", "/v1/models", None),
]


@pytest.mark.parametrize(("method", "path", "body"), V1_CALLS)
@pytest.mark.parametrize("headers", [{}, auth("psk_wrong"), {"Authorization": "Basic abc"}])
def test_every_v1_route_needs_a_valid_key(
    client: TestClient, method: str, path: str, body: dict | None, headers: dict
) -> None:
    response = client.request(method, path, json=body, headers=headers)
    assert_error(response, 401)
    assert response.headers["www-authenticate"] == "Bearer"


def test_another_tenants_private_prefix_is_indistinguishable_from_none(
    client: TestClient, tenant: Tenant, owner_with_prefix: tuple[str, dict[str, str]],
    loaded: LoadedModel,
) -> None:  # fmt: skip
    owner, _ = owner_with_prefix
    _, stranger = tenant()
    for ref in (f"{owner}/style", f"{owner}/missing"):
        get = client.get(f"/v1/prefixes/{ref}", headers=stranger)
        use = client.post("/v1/generate", json={"prompt": [1], "prefix": ref}, headers=stranger)
        model = client.post("/v1/completions", json={"model": ref, "prompt": [1]}, headers=stranger)
        delete = client.delete(f"/v1/prefixes/{ref}", headers=stranger)
        for response in (get, use, model, delete):
            error = assert_error(response, 404)
            assert error["message"] == f"prefix {ref} not found"
    listed = client.get("/v1/prefixes", params={"limit": 1000}, headers=stranger).json()["data"]
    models = client.get("/v1/models", headers=stranger).json()["data"]
    assert f"{owner}/style" not in {p["id"] for p in listed} | {m["id"] for m in models}


def test_public_prefixes_are_shared_but_only_the_owner_deletes(
    client: TestClient, tenant: Tenant, adapters: dict[str, Path], loaded: LoadedModel
) -> None:
    owner, headers = tenant()
    _, other = tenant()
    files = peft_files(adapters["prefix"])
    data = {"name": "shared", "visibility": "public"}
    assert client.post("/v1/prefixes", data=data, files=files, headers=headers).status_code == 201
    ref = f"{owner}/shared"
    assert client.get(f"/v1/prefixes/{ref}", headers=other).json()["visibility"] == "public"
    used = client.post(
        "/v1/generate",
        json={"prompt": [1, 2], "prefix": ref, "max_new_tokens": 3, "temperature": 0},
        headers=other,
    )
    assert used.json()["token_ids"] == alone(loaded, [1, 2], adapters["prefix"], 3)
    assert ref in {m["id"] for m in client.get("/v1/models", headers=other).json()["data"]}
    assert_error(client.delete(f"/v1/prefixes/{ref}", headers=other), 404)
    assert client.get(f"/v1/prefixes/{ref}", headers=headers).status_code == 200


# Operations --------------------------------------------------------------------------------


def test_health_is_503_until_ready(loaded: LoadedModel, tmp_path: Path) -> None:
    not_started = TestClient(make_client(loaded, tmp_path).app)  # no lifespan: never ready
    assert_error(not_started.get("/health"), 503, "loading")
    assert_error(not_started.post("/v1/generate", json={"prompt": [1]}, headers=auth("k")), 503)
    with make_client(loaded, tmp_path) as ready:
        assert ready.get("/health").json() == {"status": "ok", "model": loaded.model_id}


def test_overloaded_is_429_with_retry_after(
    client: TestClient, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, headers = tenant()
    scheduler = client.app.state.services.engine.core.scheduler  # type: ignore[attr-defined]

    def full(request: Request) -> None:
        raise Overloaded(retry_after=3.4, waiting=256)

    monkeypatch.setattr(scheduler, "add", full)
    response = client.post("/v1/generate", json={"prompt": [1]}, headers=headers)
    assert_error(response, 429, "overloaded")
    assert response.headers["retry-after"] == "3"


def test_metrics_export(client: TestClient, tenant: Tenant) -> None:
    _, headers = tenant()
    client.post("/v1/generate", json={"prompt": [1, 2], "max_new_tokens": 3}, headers=headers)
    text = client.get("/metrics").text
    for name in (
        'prefix_server_http_requests_total{method="POST",route="/v1/generate",status="200"}',
        "prefix_server_generated_tokens_total",
        "prefix_server_time_to_first_token_seconds_bucket",
        "prefix_server_inter_token_seconds_bucket",
        'prefix_server_pool_resident_bytes{tier="device"}',
        "prefix_server_running_rows",
        "prefix_server_pool_evictions_total",
    ):
        assert name in text, name


GARBAGE = [None, 1, -1, 1e308, "x", [], {}, [None], {"a": [1, {"b": None}]}, True, "\x00", [-5]]
ROUTES = {
    "/v1/generate": [
        "prompt",
        "prefix",
        "max_new_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "stop",
        "stream",
    ],
    "/v1/completions": [
        "model",
        "prompt",
        "max_tokens",
        "temperature",
        "n",
        "stop",
        "stream",
        "logprobs",
    ],
    "/v1/chat/completions": ["model", "messages", "max_tokens", "temperature"],
    "/v1/tenants": ["name"],
}


@pytest.mark.parametrize("route", list(ROUTES))
def test_no_garbage_body_produces_a_500(
    client: TestClient, tenant: Tenant, loaded: LoadedModel, route: str
) -> None:
    _, headers = tenant()
    base = {
        "/v1/generate": {"prompt": [1], "max_new_tokens": 1},
        "/v1/completions": {"model": loaded.model_id, "prompt": [1], "max_tokens": 1},
        "/v1/chat/completions": {
            "model": loaded.model_id,
            "messages": [{"role": "user", "content": "x"}],
        },
        "/v1/tenants": {"name": "g"},
    }[route]
    if route == "/v1/tenants":
        headers = auth("admin-secret")
    for field in ROUTES[route]:
        for value in GARBAGE:
            response = client.post(route, json={**base, field: value}, headers=headers)
            assert response.status_code < 500, (field, value, response.text)
            if response.status_code >= 400:
                assert set(response.json()["error"]) >= {"type", "message"}
    for raw in (b"", b"[]", b"null", b"\xff\xfe", b'{"prompt": 1e999}'):
        response = client.post(
            route, content=raw, headers={**headers, "content-type": "application/json"}
        )
        assert 400 <= response.status_code < 500, (raw, response.text)
