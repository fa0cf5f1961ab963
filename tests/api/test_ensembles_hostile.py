"""Prompt ensembles under hostile use: cancelled and dropped mid-stream, members deleted or
overflowing, queues full mid-submission, seeded sampling, stop strings, several prompts.

Whatever an ensemble does, it leaves nothing behind (rows, waiting counts, pins, KV blocks) and
every other request stays exact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.models import LoadedModel, wrap_model
from tests.api.conftest import (
    MakeClient,
    TenantAuth,
    alone,
    assert_error,
    create_tenant,
    peft_files,
    upload,
    wait_for,
)
from tests.api.test_ensembles import PROMPT, generate
from tests.tiny import word_tokenizer


def services(client: TestClient) -> Any:
    return client.app.state.services  # type: ignore[attr-defined]


def metric(client: TestClient, name: str, labels: str = "") -> float:
    prefix = f"{name}{{{labels}}} " if labels else f"{name} "
    lines = [line for line in client.get("/metrics").text.splitlines() if line.startswith(prefix)]
    return sum(float(line.split()[-1]) for line in lines)


def assert_nothing_held(client: TestClient) -> None:
    """No row running or waiting, no gate count, no pinned bytes, no KV block held by a row
    (resident prefixes stay, unused, until evicted)."""
    engine = services(client).engine
    wait_for(lambda: engine.in_flight == 0, "the engine to let every row go")
    assert engine.num_running == 0
    assert engine.waiting_per_tenant() == {}
    assert metric(client, "prefix_server_pool_pinned_bytes") == 0
    scheduler = engine.core.scheduler

    def rows_hold_no_blocks() -> bool:
        prefixes = scheduler.prefixes
        unused = all(p.users == 0 for p in prefixes.resident.values())
        return unused and scheduler.blocks_in_use == prefixes.num_blocks

    wait_for(rows_hold_no_blocks, "every row's KV blocks back")


def upload_members(client: TestClient, who: TenantAuth, adapters: dict[str, Path]) -> None:
    for name, kind in [("a", "prefix"), ("b", "prompt"), ("c", "p_tuning")]:
        assert upload(client, who, peft_files(adapters[kind]), name=name).status_code == 201


def test_a_mean_stream_dropped_after_its_first_event_releases_every_row_and_pin(
    client: TestClient, tenant: TenantAuth, adapters: dict[str, Path]
) -> None:
    upload_members(client, tenant, adapters)
    # Once, to the end: the members' prefixes are resident afterwards, as they are below.
    assert generate(client, tenant, prefixes=["a", "b", "c"], ensemble="mean").status_code == 200
    cancelled = metric(client, "prefix_server_requests_finished_total", 'reason="cancelled"')
    body = {"prompt": PROMPT, "max_new_tokens": 64, "temperature": 0, "ignore_eos": True,
            "stream": True, "prefixes": ["a", "b", "c"], "ensemble": "mean"}  # fmt: skip
    with client.stream("POST", "/v1/generate", json=body, headers=tenant.headers) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                break
    assert_nothing_held(client)
    after = metric(client, "prefix_server_requests_finished_total", 'reason="cancelled"')
    assert after - cancelled == 3  # every row, not only the one the stream read


def test_a_vote_whose_member_overflows_fails_alone_beside_another_tenant(
    make_client: MakeClient, adapters: dict[str, Path], loaded: LoadedModel, tmp_path: Path
) -> None:
    from tests.api.test_extreme_prefixes import extreme_adapter

    huge = extreme_adapter(adapters["prefix"], tmp_path / "huge", 3e38)
    with make_client() as client:
        mallory, bob = create_tenant(client, "mallory"), create_tenant(client, "bob")
        assert upload(client, mallory, peft_files(huge), name="huge").status_code == 201
        own = peft_files(adapters["prompt"])
        assert upload(client, mallory, own, name="fine").status_code == 201
        assert upload(client, bob, own, name="own").status_code == 201
        for method in ("vote", "mean"):
            response = generate(client, mallory, prefixes=["fine", "huge"], ensemble=method)
            if response.status_code != 200:
                assert assert_error(response, 422, "NaN")["type"] == "numerical_overflow"
            mine = generate(client, bob, prefix="own")
            assert mine.status_code == 200, mine.text
            assert mine.json()["token_ids"] == alone(loaded, PROMPT, own, 6)
        assert_nothing_held(client)


def test_seeded_sampling_of_an_ensemble(
    client: TestClient, tenant: TenantAuth, adapters: dict[str, Path], loaded: LoadedModel
) -> None:
    upload_members(client, tenant, adapters)
    seeded = {"temperature": 1.0, "seed": 1234, "top_k": 50}
    vote = generate(client, tenant, prefixes=["a", "b"], ensemble="vote", **seeded)
    assert vote.status_code == 200, vote.text
    candidates = vote.json()["ensemble"]["candidates"]
    for candidate, kind in zip(candidates, ["prefix", "prompt"], strict=True):
        expected = alone(loaded, PROMPT, peft_files(adapters[kind]), 6, **seeded)
        assert candidate["token_ids"] == expected
    means = [
        generate(client, tenant, prefixes=["a", "b", "c"], ensemble="mean", **seeded).json()
        for _ in range(2)
    ]
    assert means[0]["token_ids"] == means[1]["token_ids"]
    other = generate(client, tenant, prefixes=["a", "b", "c"], ensemble="mean",
                     **{**seeded, "seed": 99}).json()  # fmt: skip
    assert len(other["token_ids"]) == 6


def test_an_ensemble_larger_than_the_tenants_queue_is_refused_not_overloaded(
    make_client: MakeClient, adapters: dict[str, Path]
) -> None:
    with make_client(max_waiting_per_tenant=2) as client:
        alice = create_tenant(client, "alice")
        upload_members(client, alice, adapters)
        response = generate(client, alice, prefixes=["a", "b", "c"])
        # It could never be queued, so retrying can never help: a 400 naming the limit.
        assert_error(response, 400, "prefixes", "at most 2")
        assert_nothing_held(client)
        assert generate(client, alice, prefixes=["a", "b"]).status_code == 200
