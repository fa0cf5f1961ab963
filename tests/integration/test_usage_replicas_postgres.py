"""Usage and rate limits across two replicas on PostgreSQL, through HTTP.

Two apps (replicas=2) on one PostgreSQL database (tests/postgres.py starts it) and one shared
store directory, each with its own data directory, as two servers are. A mixed load from two
tenants goes to both: GET /v1/usage on either replica then equals the sum of what the responses
reported, per tenant and model, and a limit of 4 requests a minute holds across the two (each
enforces its share, 2)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.models import LoadedModel
from tests.api.conftest import (
    ADMIN_KEY,
    TenantAuth,
    app_settings,
    bearer,
    create_tenant,
    peft_files,
    upload,
    wait_for,
)
from tests.tiny import make_adapter, tiny_loaded

VIRTUAL_TOKENS = 4
FIELDS = ("requests", "rows", "prompt_tokens", "completion_tokens", "virtual_tokens",
          "failed_rate_limited")  # fmt: skip

Expected = dict[tuple[str, str | None], Counter[str]]


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return tiny_loaded("llama")


@pytest.fixture(scope="module")
def adapter(loaded: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("adapter") / "prompt"
    make_adapter(loaded.model, "prompt", VIRTUAL_TOKENS, folder, seed=1)
    return folder


@pytest.fixture
def replicas(
    loaded: LoadedModel, tmp_path: Path, database_url: str
) -> Iterator[tuple[TestClient, TestClient]]:
    common = {"database_url": database_url, "store_dir": tmp_path / "store", "replicas": 2,
              "rate_limit_refresh": 0.05, "usage_flush_interval": 0.05}  # fmt: skip

    def replica(name: str) -> TestClient:
        settings = app_settings(tmp_path / name, **common)
        return TestClient(create_app(settings, loaded=loaded, background_start=False))

    first, second = replica("one"), replica("two")
    with first, second:
        yield first, second


def post(client: TestClient, path: str, who: TenantAuth, **body: Any) -> dict[str, Any]:
    response = client.post(path, json=body, headers=who.headers)
    assert response.status_code == 200, response.text
    return dict(response.json())


def streamed_usage(client: TestClient, who: TenantAuth, **body: Any) -> dict[str, Any]:
    """A streamed completion read to its end: the usage its last chunk reports."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=body, headers=who.headers) as response:
        assert response.status_code == 200, response.read()
        events = [line[len("data: "):] for line in response.iter_lines()
                  if line.startswith("data: ")]  # fmt: skip
    assert events[-1] == "[DONE]", events
    return dict(json.loads(events[-2])["usage"])


def usage_of(client: TestClient, key: str) -> Expected:
    """Every row GET /v1/usage gives this key, page by page, summed per tenant and model."""
    found: Expected = {}
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        response = client.get("/v1/usage", params=params, headers=bearer(key))
        assert response.status_code == 200, response.text
        body = response.json()
        for row in body["data"]:
            counts = found.setdefault((row["tenant"], row["model"]), Counter())
            counts.update({name: row[name] for name in FIELDS if row[name]})
        cursor = body["next"]
        if cursor is None:
            return found


def requests_limit(client: TestClient, tenant: str) -> int:
    """The requests a minute this replica lets the tenant send: its share of the limit."""
    return int(client.app.state.services.rate_limiter.limits(tenant)[0])  # type: ignore[attr-defined]


def settled(client: TestClient, key: str, want: Expected) -> None:
    """Wait, with a deadline, until GET /v1/usage through `client` equals `want`."""
    seen: Expected = {}

    def equal() -> bool:
        seen.clear()
        seen.update(usage_of(client, key))
        return seen == want

    try:
        wait_for(equal, "the usage to be flushed", timeout=20)
    except AssertionError:
        assert seen == want  # shows the difference


def test_usage_adds_up_and_limits_hold_across_two_replicas(
    replicas: tuple[TestClient, TestClient], adapter: Path
) -> None:
    first, second = replicas
    base = first.app.state.services.model_id  # type: ignore[attr-defined]
    expected: Expected = {}

    def add(tenant: str, model: str | None, usage: dict[str, int], **counts: int) -> None:
        tokens = {name: usage[name] for name in ("prompt_tokens", "completion_tokens")
                  if usage.get(name)}  # fmt: skip
        expected.setdefault((tenant, model), Counter()).update({**tokens, **counts})

    alice = create_tenant(first, "alice")
    bob = create_tenant(second, "bob")
    # Uploaded through one replica, run by both: the database and the store are shared.
    response = upload(first, alice, peft_files(adapter), name="a")
    assert response.status_code == 201, response.text
    native = {"prompt": [1, 2, 3, 4], "max_new_tokens": 5, "temperature": 0, "ignore_eos": True}

    # Alice: a prefix and the base model on the native route, n choices on several prompts, and
    # a stream read to its end, spread over both replicas.
    usage = post(second, "/v1/generate", alice, **native, prefix="a")["usage"]
    assert usage["prefix_tokens"] == VIRTUAL_TOKENS
    add("alice", "alice/a", usage, requests=1, rows=1, virtual_tokens=VIRTUAL_TOKENS)
    usage = post(first, "/v1/generate", alice, **native)["usage"]
    add("alice", base, usage, requests=1, rows=1)
    usage = post(first, "/v1/completions", alice, model="alice/a", prompt=[[5, 6], [7, 8, 9]],
                 max_tokens=3, n=2, temperature=0)["usage"]  # fmt: skip
    add("alice", "alice/a", usage, requests=1, rows=4, virtual_tokens=2 * VIRTUAL_TOKENS)
    usage = streamed_usage(second, alice, model="alice/a", prompt=[9, 8, 7], max_tokens=6,
                           temperature=0)  # fmt: skip
    assert usage["completion_tokens"] >= 1
    add("alice", "alice/a", usage, requests=1, rows=1, virtual_tokens=VIRTUAL_TOKENS)

    # Bob: 4 requests a minute, set through one replica; each replica enforces 2 once it has
    # read the override. Six calls, alternating replicas: four answered, two refused.
    response = first.patch("/v1/tenants/bob", json={"requests_per_minute": 4},
                           headers=bearer(ADMIN_KEY))  # fmt: skip
    assert response.status_code == 200, response.text
    wait_for(lambda: all(requests_limit(c, "bob") == 2 for c in (first, second)),
             "each replica to read the override")  # fmt: skip
    answered = []
    for index in range(6):
        replica = (first, second)[index % 2]
        if index // 2 == 1:
            body: dict[str, Any] = {"model": base, "prompt": [3, 1, 4], "max_tokens": 4,
                                    "temperature": 0}  # fmt: skip
            response = replica.post("/v1/completions", json=body, headers=bob.headers)
        else:
            response = replica.post("/v1/generate", json=native, headers=bob.headers)
        answered.append(response.status_code)
        if response.status_code == 200:
            add("bob", base, response.json()["usage"], requests=1, rows=1)
        else:
            assert response.status_code == 429, response.text
            assert response.json()["error"]["type"] == "rate_limited"
            assert 1 <= int(response.headers["Retry-After"]) <= 60
            assert response.headers["x-ratelimit-limit-requests"] == "2"  # this replica's share
            add("bob", None, {}, failed_rate_limited=1)  # refused before any model was read
    assert answered == [200, 200, 200, 200, 429, 429], answered

    # Every count, flushed by whichever replica ran it, adds into the same rows: either replica
    # reports the whole; a tenant sees its own.
    views = [(first, ADMIN_KEY, None), (second, ADMIN_KEY, None), (second, alice.api_key, "alice")]
    for client, key, tenant in views:
        settled(client, key, {k: v for k, v in expected.items() if tenant in (None, k[0])})
