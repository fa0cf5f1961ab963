"""GET /v1/usage adds up: over a mixed load (single prefixes, ensembles, n choices, a stream
cancelled midway, failures, a fine-tuning job), the totals equal what the responses reported,
and they survive a restart. Counts are flushed in batches off the event loop: each wait below
is on the flush having happened, with a deadline."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from prefixes.usage.ledger import GroupBy, encode_cursor
from server.api.app import create_app
from server.models import LoadedModel
from tests.api.conftest import (
    ADMIN_KEY,
    NUM_VIRTUAL_TOKENS,
    TenantAuth,
    app_settings,
    bearer,
    create_tenant,
    peft_files,
    upload,
    wait_for,
)
from tests.api.tuning import MODEL, start_job, wait_status, worded

FAST_FLUSH = {"usage_flush_interval": 0.05, "max_new_tokens_limit": 64}
PROMPT_VT, PREFIX_VT = NUM_VIRTUAL_TOKENS["prompt"], NUM_VIRTUAL_TOKENS["prefix"]
TOTALS = ("requests", "rows", "prompt_tokens", "completion_tokens", "virtual_tokens")


def usage_rows(client: TestClient, key: str, **params: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    cursor = None
    while True:
        page_params = {**params, **({"cursor": cursor} if cursor else {})}
        response = client.get("/v1/usage", params=page_params, headers=bearer(key))
        assert response.status_code == 200, response.text
        body = response.json()
        rows += body["data"]
        cursor = body["next"]
        if cursor is None:
            return rows


def by_model(rows: list[dict[str, Any]]) -> dict[str, Counter[str]]:
    found: dict[str, Counter[str]] = {}
    for row in rows:
        counts = found.setdefault(row["model"], Counter())
        counts.update({k: v for k, v in row.items() if isinstance(v, int) and "time" not in k})
    return found


def settled(client: TestClient, key: str, expected: dict[str, Counter[str]]) -> None:
    """Wait until the flushed usage equals `expected` (per model, the fields it names)."""
    seen: dict[str, Counter[str]] = {}

    def equal() -> bool:
        seen.clear()
        seen.update(by_model(usage_rows(client, key, limit=2)))
        return all(
            {k: seen.get(model, Counter())[k] for k in want} == dict(want)
            for model, want in expected.items()
        )

    try:
        wait_for(equal, "the usage to be flushed", timeout=20)
    except AssertionError:
        assert seen == expected  # shows the difference


def cursor_of(key: list[Any], group_by: str = "prefix") -> str:
    """A cursor as the server encodes one, holding any key (a crafted one)."""
    return encode_cursor(GroupBy(group_by), tuple(key))


def native(client: TestClient, who: TenantAuth, **body: Any) -> dict[str, Any]:
    body = {"prompt": [1, 2, 3, 4], "max_new_tokens": 5, "temperature": 0, **body}
    response = client.post("/v1/generate", json=body, headers=who.headers)
    assert response.status_code == 200, response.text
    return dict(response.json())


@pytest.fixture
def worded_model(loaded: LoadedModel) -> LoadedModel:
    return worded(loaded)


def test_usage_equals_what_the_responses_reported_and_survives_a_restart(
    worded_model: LoadedModel, adapters: dict[str, Path], tmp_path: Path
) -> None:
    settings = app_settings(tmp_path / "data", **FAST_FLUSH)
    expected: dict[str, Counter[str]] = {}

    def add(model: str, **counts: int) -> None:
        expected.setdefault(model, Counter()).update(counts)

    with TestClient(create_app(settings, loaded=worded_model, background_start=False)) as client:
        alice = create_tenant(client, "alice")
        bob = create_tenant(client, "bob")
        for name, kind in [("a", "prompt"), ("b", "prefix"), ("cut", "prompt")]:
            response = upload(client, alice, peft_files(adapters[kind]), name=name)
            assert response.status_code == 201, response.text
        ensemble = {"name": "duo", "prefixes": ["a", "b"], "method": "mean"}
        response = client.post("/v1/ensembles", json=ensemble, headers=alice.headers)
        assert response.status_code == 201, response.text

        # Single prefixes, the base model, n choices and several prompts (completions).
        for prefix in ("a", "alice/b", None):
            usage = native(client, alice, prefix=prefix)["usage"]
            model = f"alice/{prefix.split('/')[-1]}" if prefix else MODEL
            add(model, requests=1, rows=1, prompt_tokens=usage["prompt_tokens"],
                completion_tokens=usage["completion_tokens"],
                virtual_tokens=usage["prefix_tokens"])  # fmt: skip
        body = {"model": "alice/a", "prompt": [[5, 6], [7, 8, 9]], "max_tokens": 3, "n": 2,
                "temperature": 0}  # fmt: skip
        response = client.post("/v1/completions", json=body, headers=alice.headers)
        assert response.status_code == 200, response.text
        usage = response.json()["usage"]
        add("alice/a", requests=1, rows=4, prompt_tokens=usage["prompt_tokens"],
            completion_tokens=usage["completion_tokens"], virtual_tokens=2 * PROMPT_VT)  # fmt: skip
        # A vote (each member's row under its own prefix; every candidate's tokens) and a stored
        # mean ensemble (its rows under its own name; one answer).
        voted = native(client, alice, prefixes=["a", "b"], ensemble="vote")
        candidates = {c["prefix"]: len(c["token_ids"]) for c in voted["ensemble"]["candidates"]}
        add("alice/a", requests=1, rows=1, prompt_tokens=4, completion_tokens=candidates["alice/a"],
            virtual_tokens=PROMPT_VT)  # fmt: skip
        add("alice/b", rows=1, completion_tokens=candidates["alice/b"], virtual_tokens=PREFIX_VT)
        mean = native(client, alice, prefix="duo")["usage"]
        add("alice/duo", requests=1, rows=2, prompt_tokens=mean["prompt_tokens"],
            completion_tokens=mean["completion_tokens"],
            virtual_tokens=mean["prefix_tokens"])  # fmt: skip
        # Failures: a prompt the engine refuses, and bob's call (another tenant's usage).
        too_long = {"prompt": list(range(1, 130)), "prefix": "a", "max_new_tokens": 5}
        response = client.post("/v1/generate", json=too_long, headers=alice.headers)
        assert response.status_code == 400, response.text
        add("alice/a", failed_invalid=1)
        native(client, bob)

        # A stream cancelled after its first event counts what the engine generated for it.
        engine = client.app.state.services.engine  # type: ignore[attr-defined]
        wait_for(lambda: engine.in_flight == 0, "the engine to be idle")
        generated = engine.metrics.generated_tokens
        stream = {"prompt": [1, 2, 3], "prefix": "cut", "max_new_tokens": 64, "ignore_eos": True,
                  "stream": True}  # fmt: skip
        with client.stream("POST", "/v1/generate", json=stream, headers=alice.headers) as response:
            assert response.status_code == 200
            next(line for line in response.iter_lines() if line.startswith("data: "))
        wait_for(lambda: engine.in_flight == 0, "the cancelled stream to leave the engine")
        cut = engine.metrics.generated_tokens - generated
        assert 1 <= cut < 64
        add("alice/cut", requests=1, rows=1, prompt_tokens=3, completion_tokens=cut,
            virtual_tokens=PROMPT_VT, cancelled=1)  # fmt: skip

        # A small fine-tuning job counts the tokens it trained on, under the model it trains.
        job = start_job(client, alice, hyperparameters={"n_epochs": 1, "batch_size": 3})
        job = wait_status(client, alice, job["id"])
        assert job["status"] == "succeeded", job
        add(MODEL, tuning_tokens=job["trained_tokens"])
        # One transferring from a prefix counts under it as `owner/name`, however the job named
        # it (here by its bare name), as generations with that prefix count.
        job = start_job(
            client, alice, model="cut", hyperparameters={"n_epochs": 1, "batch_size": 3}
        )
        job = wait_status(client, alice, job["id"])
        assert job["status"] == "succeeded", job
        add("alice/cut", tuning_tokens=job["trained_tokens"])

        settled(client, alice.api_key, expected)
        # The admin sees every tenant; bob sees only his own.
        everyone = {row["tenant"] for row in usage_rows(client, ADMIN_KEY)}
        assert everyone == {"alice", "bob"}
        assert {row["tenant"] for row in usage_rows(client, bob.api_key)} == {"bob"}
        only_bob = usage_rows(client, ADMIN_KEY, tenant="bob")
        assert {row["tenant"] for row in only_bob} == {"bob"}

    # A restart on the same database: everything counted before is still there, once.
    with TestClient(create_app(settings, loaded=worded_model, background_start=False)) as client:
        settled(client, alice.api_key, expected)  # equal, not doubled by the final flush


def test_a_tenant_sees_only_its_own_usage_and_the_query_is_checked(
    make_client: Any,
) -> None:
    with make_client(**FAST_FLUSH) as client:
        alice = create_tenant(client, "alice")
        create_tenant(client, "bob")
        native(client, alice)
        base = client.app.state.services.model_id  # type: ignore[attr-defined]
        settled(client, alice.api_key, {base: Counter(requests=1)})
        response = client.get("/v1/usage", params={"tenant": "bob"}, headers=alice.headers)
        assert response.status_code == 403, response.text
        bad = [({"group_by": "week"}, "group_by"), ({"start": -1}, "start"),
               ({"start": 7200, "end": 3600}, "end"), ({"cursor": "x"}, "cursor"),
               ({"cursor": cursor_of(["alice"])}, "cursor"),
               ({"cursor": cursor_of([1, "alice"])}, "cursor"),
               ({"cursor": cursor_of([10**20, "alice", "m"], "hour"), "group_by": "hour"},
                "cursor"),
               ({"cursor": cursor_of([3600, "alice", "m"], "hour"), "group_by": "day"}, "hour"),
               ({"cursor": cursor_of(["alice", "m\x00"])}, "cursor")]  # fmt: skip
        # the admin's `tenant` is a tenant name (a NUL, which PostgreSQL's text refuses, too)
        for name in ("bob\x00", "Bob", "b" * 65):
            response = client.get("/v1/usage", params={"tenant": name}, headers=bearer(ADMIN_KEY))
            assert response.status_code == 422 and "tenant" in response.text, response.text
        for params, field in bad:
            response = client.get("/v1/usage", params=params, headers=alice.headers)
            assert response.status_code in (400, 422), response.text
            assert field in response.text
        hours = usage_rows(client, alice.api_key, group_by="hour")
        assert [row["end_time"] - row["start_time"] for row in hours] == [3600]
        csv = client.get("/v1/usage", params={"format": "csv"}, headers=alice.headers)
        assert csv.headers["content-type"].startswith("text/csv")
        header, line = csv.text.splitlines()
        assert header.split(",")[:5] == ["start_time", "end_time", "tenant", "model", "requests"]
        assert line.split(",")[2:5] == ["alice", base, "1"]
