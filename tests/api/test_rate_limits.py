"""Rate limits through HTTP: OpenAI's x-ratelimit-* headers on every route, 429 with
Retry-After before any work is queued, a retry that then succeeds, another tenant unaffected
and exact, overrides applied at once, and replicas each enforcing their share."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from server.api.app import create_app
from server.models import LoadedModel
from tests.api.conftest import (
    ADMIN_KEY,
    MakeClient,
    app_settings,
    bearer,
    create_tenant,
    wait_for,
)

HEADERS = ("requests", "tokens")
BODY = {"prompt": [1, 2, 3, 4], "max_new_tokens": 6, "temperature": 0, "ignore_eos": True}


def limits(response: Any) -> dict[str, str]:
    return {
        f"{kind}.{part}": response.headers[f"x-ratelimit-{part}-{kind}"]
        for kind in HEADERS
        for part in ("limit", "remaining", "reset")
    }


def patch_limits(client: TestClient, name: str, **values: int | None) -> dict[str, Any]:
    response = client.patch(f"/v1/tenants/{name}", json=values, headers=bearer(ADMIN_KEY))
    assert response.status_code == 200, response.text
    return dict(response.json()["rate_limits"])


def test_headers_on_every_route_count_requests_and_tokens(make_client: MakeClient) -> None:
    with make_client() as client:
        alice = create_tenant(client, "alice")
        # 60 requests and 600 tokens a minute: the windows drain by 1 and 10 a second, so
        # each figure is bounded by what was sent and what drained since (the test's clock).
        assert patch_limits(client, "alice", requests_per_minute=60, tokens_per_minute=600) == {
            "requests_per_minute": 60, "tokens_per_minute": 600}  # fmt: skip
        calls = [
            ("GET", "/v1/prefixes", None),
            ("GET", "/v1/models", None),
            ("GET", "/v1/tenants/alice", None),
            ("GET", "/v1/usage", None),
            ("GET", "/v1/files", None),
            ("GET", "/v1/fine_tuning/jobs", None),
            ("GET", "/tokenizer_info", None),
            ("POST", "/v1/chat/completions", {"model": "x", "messages": []}),  # an error too
            ("POST", "/v1/generate", BODY),
            ("POST", "/v1/generate", {**BODY, "stream": True}),
            ("GET", "/v1/prefixes/alice/none", None),
        ]
        started = time.monotonic()
        for index, (method, path, body) in enumerate(calls):
            response = client.request(method, path, json=body, headers=alice.headers)
            drained = (time.monotonic() - started) * 1  # requests a second
            assert response.status_code < 500, response.text
            figures = limits(response)
            assert (figures["requests.limit"], figures["tokens.limit"]) == ("60", "600"), path
            remaining = int(figures["requests.remaining"])
            assert 60 - (index + 1) <= remaining <= 60 - (index + 1) + drained + 1, path
            assert figures["requests.reset"].endswith("s"), figures
            if path == "/v1/generate" and not body.get("stream"):  # type: ignore[union-attr]
                # Reserved at admission: the prompt's 4 tokens and max_new_tokens 6.
                tokens = int(figures["tokens.remaining"])
                assert 600 - 10 <= tokens <= 600 - 10 + drained * 10 + 1, figures
        # The admin key is not rate limited and carries no figures; nor does a 401.
        admin = client.get("/v1/usage", headers=bearer(ADMIN_KEY))
        assert "x-ratelimit-limit-requests" not in admin.headers
        anonymous = client.get("/v1/prefixes")
        assert (
            anonymous.status_code == 401 and "x-ratelimit-limit-requests" not in anonymous.headers
        )


def test_over_a_limit_is_429_then_a_retry_succeeds_and_others_are_unaffected(
    make_client: MakeClient,
) -> None:
    with make_client(usage_flush_interval=0.05) as client:
        alice = create_tenant(client, "alice")
        bob = create_tenant(client, "bob")
        # Bob's exact tokens alone, to compare with what he gets beside alice's refusals.
        alone = client.post("/v1/generate", json=BODY, headers=bob.headers).json()["token_ids"]
        patch_limits(client, "alice", requests_per_minute=120, tokens_per_minute=30)
        # Tokens: each call reserves 4 + 6 = 10; the fourth within the same second is over.
        engine = client.app.state.services.engine  # type: ignore[attr-defined]
        statuses = []
        bob_tokens: list[list[int]] = []

        def bob_runs() -> None:
            for _ in range(4):
                response = client.post("/v1/generate", json=BODY, headers=bob.headers)
                assert response.status_code == 200, response.text
                bob_tokens.append(response.json()["token_ids"])

        victim = threading.Thread(target=bob_runs)
        victim.start()
        refused = None
        for _ in range(6):
            response = client.post("/v1/generate", json=BODY, headers=alice.headers)
            statuses.append(response.status_code)
            if response.status_code == 429:
                refused = response
                break
        victim.join()
        assert refused is not None, statuses
        error = refused.json()["error"]
        assert error["type"] == "rate_limited" and "tokens per minute" in error["message"]
        retry_after = int(refused.headers["Retry-After"])
        assert 1 <= retry_after <= 60
        assert limits(refused)["tokens.limit"] == "30"
        assert int(limits(refused)["tokens.remaining"]) < 10
        assert bob_tokens == [alone] * 4  # unaffected and exact
        # Nothing of the refused call reached the engine, and it is counted as rate limited.
        wait_for(lambda: engine.in_flight == 0, "the engine to be idle")
        # After Retry-After the same call fits: the limiter's clock moved on, not waited for.
        limiter = client.app.state.services.rate_limiter  # type: ignore[attr-defined]
        real = limiter.clock
        limiter.clock = lambda: real() + max(0.0, retry_after - 1.2)
        early = client.post("/v1/generate", json=BODY, headers=alice.headers)
        assert early.status_code == 429, early.text  # well before Retry-After: still over
        limiter.clock = lambda: real() + retry_after
        response = client.post("/v1/generate", json=BODY, headers=alice.headers)
        assert response.status_code == 200, response.text
        wait_for(
            lambda: sum(
                r["failed_rate_limited"]
                for r in client.get("/v1/usage", headers=alice.headers).json()["data"]
            ) >= 1,
            "the refusal to be counted",
        )  # fmt: skip


def test_overrides_apply_at_once(make_client: MakeClient) -> None:
    with make_client() as client:
        alice = create_tenant(client, "alice")
        patch_limits(client, "alice", requests_per_minute=0)
        refused = client.get("/v1/prefixes", headers=alice.headers)
        assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limited"
        assert refused.headers["Retry-After"] == "60"
        patch_limits(client, "alice", requests_per_minute=5)
        allowed = client.get("/v1/prefixes", headers=alice.headers)
        assert allowed.status_code == 200, allowed.text
        assert limits(allowed)["requests.limit"] == "5"
        assert patch_limits(client, "alice", requests_per_minute=None)["requests_per_minute"] == (
            60_000  # back to the server's default
        )
        for value in (-1, "5", 1.5, True):
            response = client.patch(
                "/v1/tenants/alice", json={"tokens_per_minute": value}, headers=bearer(ADMIN_KEY)
            )
            assert response.status_code == 422 and "tokens_per_minute" in response.text


def test_a_call_larger_than_the_whole_token_limit_is_400(make_client: MakeClient) -> None:
    with make_client() as client:
        alice = create_tenant(client, "alice")
        patch_limits(client, "alice", tokens_per_minute=8)
        response = client.post("/v1/generate", json=BODY, headers=alice.headers)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["field"] == "max_tokens"


def test_two_replicas_on_one_database_each_enforce_their_share(
    loaded: LoadedModel, tmp_path: Path
) -> None:
    """Two servers (replicas=2) on one SQLite database: a limit of 4 requests a minute lets
    each replica take 2, so together they never exceed 4, and an override made through one
    reaches the other at its next refresh."""
    database = f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    common = {"database_url": database, "replicas": 2, "rate_limit_refresh": 0.05}
    first = TestClient(create_app(app_settings(tmp_path / "one", **common), loaded=loaded,
                                  background_start=False))  # fmt: skip
    second = TestClient(create_app(app_settings(tmp_path / "two", **common), loaded=loaded,
                                   background_start=False))  # fmt: skip
    with first, second:
        alice = create_tenant(first, "alice")
        patch_limits(first, "alice", requests_per_minute=4)
        wait_for(
            lambda: second.app.state.services.rate_limiter.limits("alice")[0] == 2,  # type: ignore[attr-defined]
            "the other replica to read the override",
        )
        answered = [
            replica.get("/v1/prefixes", headers=alice.headers).status_code
            for replica in (first, second, first, second, first, second)
        ]
        assert answered.count(200) == 4 and answered.count(429) == 2, answered


def test_the_document_declares_the_headers_as_they_are_sent(make_client: MakeClient) -> None:
    """/openapi.json is valid OpenAPI 3.1; every operation that takes a key declares the six
    x-ratelimit-* headers on each response (not required: an admin's answers lack them) and a
    required Retry-After on its 429; what a tenant really gets matches those schemas."""
    from jsonschema import Draft202012Validator
    from schemathesis.specs.openapi.definitions import OPENAPI_31_VALIDATOR

    with make_client() as client:
        document = client.get("/openapi.json").json()
        OPENAPI_31_VALIDATOR.validate(document)
        declared = document["components"]["headers"]
        names = [f"x-ratelimit-{part}-{kind}" for kind in HEADERS
                 for part in ("limit", "remaining", "reset")]  # fmt: skip
        keyed = [
            (path, method, operation)
            for path, operations in document["paths"].items()
            for method, operation in operations.items()
            if "security" in operation
        ]
        assert len(keyed) == sum(len(ops) for ops in document["paths"].values()) - 1  # /health
        for path, method, operation in keyed:
            for status, response in operation["responses"].items():
                headers = response.get("headers", {})
                for name in names:
                    assert headers.get(name) == {"$ref": f"#/components/headers/{name}"}, (
                        method, path, status, name)  # fmt: skip
                    assert not declared[name].get("required", False)
                if status == "429":
                    assert headers["Retry-After"] == {"$ref": "#/components/headers/Retry-After"}
        assert declared["Retry-After"]["required"] is True

        def conforms(response: Any, name: str) -> None:
            value: Any = response.headers[name]
            schema = declared[name]["schema"]
            if schema["type"] == "integer":
                assert value.isdigit(), (name, value)
                value = int(value)
            Draft202012Validator(schema).validate(value)

        alice = create_tenant(client, "alice")
        patch_limits(client, "alice", requests_per_minute=1)
        allowed = client.post("/v1/generate", json=BODY, headers=alice.headers)
        refused = client.post("/v1/generate", json=BODY, headers=alice.headers)
        assert (allowed.status_code, refused.status_code) == (200, 429), refused.text
        for response in (allowed, refused):
            for name in names:
                conforms(response, name)
        conforms(refused, "Retry-After")


def test_a_reservation_is_settled_with_what_the_call_used(make_client: MakeClient) -> None:
    """A stream reserving 4 + 60 tokens and cancelled after its first event gives back what it
    did not generate when it leaves the engine: the window holds only the tokens it used."""
    with make_client() as client:
        alice = create_tenant(client, "alice")
        # 70 tokens a minute: the window drains about 1.2 a second, so the 60 - cut reserved
        # and never generated would take close to a minute to drain without the settlement.
        patch_limits(client, "alice", tokens_per_minute=70)
        engine = client.app.state.services.engine  # type: ignore[attr-defined]
        generated = engine.metrics.generated_tokens
        stream = {**BODY, "max_new_tokens": 60, "stream": True}
        with client.stream("POST", "/v1/generate", json=stream, headers=alice.headers) as response:
            assert response.status_code == 200
            assert limits(response)["tokens.remaining"] == "6"  # 70 - 64 reserved
            next(line for line in response.iter_lines() if line.startswith("data: "))
        wait_for(lambda: engine.in_flight == 0, "the cancelled stream to leave the engine")
        cut = engine.metrics.generated_tokens - generated
        assert 1 <= cut < 60

        def settled() -> bool:  # every request's headers show the tokens window too
            response = client.get("/v1/prefixes", headers=alice.headers)
            return int(limits(response)["tokens.remaining"]) >= 70 - (4 + cut)

        wait_for(settled, "the reservation to be settled", timeout=10)
        # What was given back is usable at once: a call reserving 4 + 61 - cut fits.
        again = client.post("/v1/generate", json={**BODY, "max_new_tokens": 61 - cut},
                            headers=alice.headers)  # fmt: skip
        assert again.status_code == 200, again.text
