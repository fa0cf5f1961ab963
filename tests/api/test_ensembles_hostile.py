"""Prompt ensembles under hostile use: cancelled and dropped mid-stream, members deleted or
overflowing, queues full mid-submission, seeded sampling, stop strings, several prompts.

Whatever an ensemble does, it leaves nothing behind (rows, waiting counts, pins, KV blocks) and
every other request stays exact."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.models import LoadedModel, wrap_model
from tests.api.conftest import (
    MakeClient,
    StalledEngine,
    TenantAuth,
    alone,
    assert_error,
    create_tenant,
    in_background,
    peft_files,
    upload,
    wait_for,
)
from tests.api.test_ensembles import PROMPT, generate
from tests.api.test_generate import sse_events
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


def hold_after_first_token_until_cancelled(engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once a running row has a token, the engine's next step waits until a cancellation is
    posted: on a fast machine the rows could otherwise finish before the dropped stream is
    noticed, and nothing would be left to cancel."""
    posted = threading.Event()
    post_cancel, prepare = engine._post_cancel, engine.core._prepare

    def noted_post_cancel(request: Any) -> None:
        post_cancel(request)
        posted.set()

    def held_prepare(plan: Any) -> Any:
        if any(r.output_token_ids for r in engine.core.running):
            assert posted.wait(30), "the dropped stream was never cancelled"
        return prepare(plan)

    monkeypatch.setattr(engine, "_post_cancel", noted_post_cancel)
    monkeypatch.setattr(engine.core, "_prepare", held_prepare)


def test_a_mean_stream_dropped_after_its_first_event_releases_every_row_and_pin(
    client: TestClient,
    tenant: TenantAuth,
    adapters: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    upload_members(client, tenant, adapters)
    # Once, to the end: the members' prefixes are resident afterwards, as they are below.
    assert generate(client, tenant, prefixes=["a", "b", "c"], ensemble="mean").status_code == 200
    cancelled = metric(client, "prefix_server_requests_finished_total", 'reason="cancelled"')
    hold_after_first_token_until_cancelled(services(client).engine, monkeypatch)
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
    make_client: MakeClient,
    adapters: dict[str, Path],
    loaded: LoadedModel,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.api.test_extreme_prefixes import AdmitTogether, extreme_adapter

    huge = extreme_adapter(adapters["prefix"], tmp_path / "huge", 3e38)
    with make_client() as client:
        mallory, bob = create_tenant(client, "mallory"), create_tenant(client, "bob")
        assert upload(client, mallory, peft_files(huge), name="huge").status_code == 201
        own = peft_files(adapters["prompt"])
        assert upload(client, mallory, own, name="fine").status_code == 201
        assert upload(client, bob, own, name="own").status_code == 201
        for method in ("vote", "mean"):
            response = generate(client, mallory, prefixes=["fine", "huge"], ensemble=method)
            # The overflowing member fails its ensemble (a vote does not answer without it).
            assert assert_error(response, 422, "NaN")["type"] == "numerical_overflow"
            mine = generate(client, bob, prefix="own")
            assert mine.status_code == 200, mine.text
            assert mine.json()["token_ids"] == alone(loaded, PROMPT, own, 6)
        # In the same steps: the ensemble's rows and bob's admitted together.
        gate = AdmitTogether(services(client).engine, monkeypatch)
        for method in ("vote", "mean"):
            ensemble = {"prompt": PROMPT, "max_new_tokens": 6, "temperature": 0,
                        "prefixes": ["fine", "huge"], "ensemble": method}  # fmt: skip
            single = {"prompt": PROMPT, "max_new_tokens": 6, "temperature": 0, "prefix": "own"}
            gate.expected = 3  # rows: two members and bob's
            with ThreadPoolExecutor(2) as pool:
                theirs = pool.submit(
                    client.post, "/v1/generate", json=ensemble, headers=mallory.headers
                )
                mine = pool.submit(client.post, "/v1/generate", json=single, headers=bob.headers)
                assert_error(theirs.result(timeout=60), 422, "NaN")
                assert mine.result(timeout=60).json()["token_ids"] == alone(loaded, PROMPT, own, 6)
        assert "prefix_server_engine_failed_steps_total 0.0" in client.get("/metrics").text
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


def test_a_full_queue_in_the_middle_of_an_ensemble_leaves_no_pin_or_count_behind(
    make_client: MakeClient, adapters: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    with make_client(max_waiting_per_tenant=3) as client:
        alice = create_tenant(client, "alice")
        upload_members(client, alice, adapters)
        engine = services(client).engine
        stalled = StalledEngine(engine, monkeypatch)
        single = {"prompt": PROMPT, "max_new_tokens": 4, "temperature": 0, "prefix": "c"}
        with ExitStack() as stack:
            first = stack.enter_context(
                in_background(client, "/v1/generate", single, alice.headers)
            )
            try:
                assert stalled.stepping.wait(20)  # admitted and held: the queue is empty again
                queued = stack.enter_context(
                    in_background(client, "/v1/generate", single, alice.headers)
                )
                wait_for(lambda: stalled.waiting == 1, "the single request to queue")
                pinned = metric(client, "prefix_server_pool_pinned_bytes")
                # Two rows fit the tenant's queue (3), the third does not: all or none.
                response = generate(client, alice, prefixes=["a", "b", "c"])
                assert_error(response, 429, "overloaded")
                assert stalled.waiting == 1
                assert metric(client, "prefix_server_pool_pinned_bytes") == pinned
            finally:
                stalled.go()
        for result in (first, queued):
            assert result["response"].status_code == 200, result["response"].text
        assert_nothing_held(client)
        assert generate(client, alice, prefixes=["a", "b", "c"]).status_code == 200


def test_members_deleted_or_replaced_while_the_ensemble_waits_run_as_they_were_pinned(
    client: TestClient,
    tenant: TenantAuth,
    adapters: dict[str, Path],
    loaded: LoadedModel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    upload_members(client, tenant, adapters)
    created = client.post(
        "/v1/ensembles", json={"name": "panel", "prefixes": ["a", "b"]}, headers=tenant.headers
    )
    assert created.status_code == 201, created.text
    stalled = StalledEngine(services(client).engine, monkeypatch)
    blocker = {"prompt": [1, 2], "max_new_tokens": 2, "temperature": 0, "prefix": "c"}
    body = {"prompt": PROMPT, "max_new_tokens": 6, "temperature": 0, "prefix": "panel"}
    with ExitStack() as stack:
        stack.enter_context(in_background(client, "/v1/generate", blocker, tenant.headers))
        try:
            assert stalled.stepping.wait(20)  # the blocker is admitted and held
            voted = stack.enter_context(in_background(client, "/v1/generate", body, tenant.headers))
            wait_for(lambda: stalled.waiting == 2, "the ensemble's rows to queue")
            deleted = client.delete("/v1/prefixes/alice/b", headers=tenant.headers)
            assert deleted.status_code == 204
            files = peft_files(adapters["prompt"])
            replaced = upload(client, tenant, files, name="a", overwrite="true")
            assert replaced.status_code in (200, 201), replaced.text
        finally:
            stalled.go()  # whatever failed above, the engine goes on
    response = voted["response"]
    assert response.status_code == 200, response.text
    candidates = response.json()["ensemble"]["candidates"]
    assert [c["token_ids"] for c in candidates] == [
        alone(loaded, PROMPT, peft_files(adapters[kind]), 6) for kind in ("prefix", "prompt")
    ]
    error = assert_error(generate(client, tenant, prefix="panel"), 404, "alice/panel", "b")
    assert error["type"] == "not_found"
    assert_nothing_held(client)


@pytest.fixture
def words(make_client: MakeClient, loaded: LoadedModel, adapters: dict[str, Path]) -> Any:
    """The tiny model with a word tokenizer and a chat template, alice and her three members."""
    from tests.api.tuning import CHAT_TEMPLATE

    tokenizer = word_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    model = wrap_model(loaded.model, tokenizer, "tiny-words")
    with make_client(model=model) as client:
        alice = create_tenant(client, "alice")
        upload_members(client, alice, adapters)
        yield client, alice, model


def test_a_vote_whose_members_stop_at_different_times(words: Any) -> None:
    client, alice, _ = words
    free = generate(client, alice, prompt="w5 w17 w42", prefixes=["a", "b", "c"], max_new_tokens=8)
    assert free.status_code == 200, free.text
    texts = [c["text"] for c in free.json()["ensemble"]["candidates"]]
    # A stop string one member reaches early, the others later or never.
    stop = texts[0].split()[2]
    expected = [t[: t.find(stop)] if stop in t else t for t in texts]
    response = generate(
        client, alice, prompt="w5 w17 w42", prefixes=["a", "b", "c"], max_new_tokens=8, stop=[stop]
    )
    assert response.status_code == 200, response.text
    candidates = response.json()["ensemble"]["candidates"]
    assert [c["text"] for c in candidates] == expected
    assert [c["finish_reason"] for c in candidates] == [
        "stop" if stop in t else "length" for t in texts
    ]
    assert candidates[0]["finish_reason"] == "stop"
    assert_nothing_held(client)


def test_a_mean_with_a_stop_string_streamed_and_not(words: Any) -> None:
    client, alice, _ = words
    body = {"prompt": "w5 w17 w42", "prefixes": ["a", "b", "c"], "ensemble": "mean",
            "max_new_tokens": 8}  # fmt: skip
    full = generate(client, alice, **body).json()
    stop = full["text"].split()[3]
    cut = full["text"][: full["text"].find(stop)]
    stopped = generate(client, alice, **body, stop=[stop]).json()
    assert (stopped["text"], stopped["finish_reason"]) == (cut, "stop")
    streamed = client.post(
        "/v1/generate",
        json={"temperature": 0, **body, "stop": [stop], "stream": True},
        headers=alice.headers,
    )
    events = sse_events(streamed)
    assert "".join(e["text"] for e in events) == cut
    assert events[-1]["finish_reason"] == "stop"
    assert_nothing_held(client)


def test_completions_with_several_prompts_on_a_stored_vote(words: Any) -> None:
    client, alice, _ = words
    stored = {"name": "panel", "prefixes": ["a", "b", "c"], "method": "vote"}
    assert client.post("/v1/ensembles", json=stored, headers=alice.headers).status_code == 201
    prompts = ["w5 w17 w42", "w9 w8", "w100 w3 w3 w7"]
    body = {"model": "panel", "prompt": prompts, "max_tokens": 5, "temperature": 0}
    response = client.post("/v1/completions", json=body, headers=alice.headers)
    assert response.status_code == 200, response.text
    choices = response.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    for prompt, choice in zip(prompts, choices, strict=True):
        voted = generate(client, alice, prompt=prompt, prefix="panel", max_new_tokens=5).json()
        assert choice["text"] == voted["text"], prompt
    assert_nothing_held(client)


def test_chat_streams_a_stored_mean(words: Any) -> None:
    client, alice, model = words
    stored = {"name": "panel", "prefixes": ["a", "b"], "method": "mean"}
    assert client.post("/v1/ensembles", json=stored, headers=alice.headers).status_code == 201
    messages = [{"role": "user", "content": "w5 w17"}]
    prompt = model.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    answer = generate(client, alice, prompt=prompt, prefix="panel")
    assert answer.status_code == 200, answer.text
    expected = answer.json()["text"]
    body = {"model": "alice/panel", "messages": messages, "max_tokens": 6, "temperature": 0}
    whole = client.post("/v1/chat/completions", json=body, headers=alice.headers)
    assert whole.status_code == 200, whole.text
    assert whole.json()["choices"][0]["message"]["content"] == expected
    events = sse_events(
        client.post("/v1/chat/completions", json={**body, "stream": True}, headers=alice.headers)
    )
    assert events[0]["model"] == "alice/panel"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == expected
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert_nothing_held(client)


def test_the_same_ensemble_created_and_deleted_concurrently_has_one_owner_at_a_time(
    client: TestClient, tenant: TenantAuth, adapters: dict[str, Path]
) -> None:
    upload_members(client, tenant, adapters)
    body = {"name": "panel", "prefixes": ["a", "b"], "method": "mean"}

    def create() -> int:
        return client.post("/v1/ensembles", json=body, headers=tenant.headers).status_code

    def remove() -> int:
        return client.delete("/v1/ensembles/alice/panel", headers=tenant.headers).status_code

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(create if i % 2 else remove) for i in range(60)]
        statuses = [f.result(timeout=60) for f in futures]
    assert set(statuses) <= {201, 204, 404, 409}, statuses
    listed = [e["id"] for e in client.get("/v1/ensembles", headers=tenant.headers).json()["data"]]
    assert listed in ([], ["alice/panel"])
    created, deleted = statuses.count(201), statuses.count(204)
    assert created - deleted == len(listed)  # every create and delete took effect exactly once
    if listed:
        assert generate(client, tenant, prefix="panel").status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"name": "e"},
        {"name": "e", "prefixes": None},
        {"name": "e", "prefixes": [1, 2]},
        {"name": "e", "prefixes": ["a", None]},
        {"name": "e", "prefixes": ["a", ""]},
        {"name": "e", "prefixes": ["a", "/"]},
        {"name": "e", "prefixes": ["a", "x/y/z"]},
        {"name": "e", "prefixes": ["a", "ALICE/b"]},
        {"name": "e", "prefixes": ["a", "a\u0000"]},
        {"name": "e", "prefixes": ["a", "b" * 10_000]},
        {"name": "e", "prefixes": ["a"] * 100_000},
        {"name": "e", "prefixes": [f"p{i}" for i in range(300)]},
        {"name": "", "prefixes": ["a", "b"]},
        {"name": "e" * 10_000, "prefixes": ["a", "b"]},
        {"name": "\ud800", "prefixes": ["a", "b"]},
        {"name": "e", "prefixes": ["a", "b"], "description": "d" * 2000},
        {"name": "e", "prefixes": ["a", "b"], "description": None},
        {"name": "e", "prefixes": ["a", "b"], "visibility": "PUBLIC"},
        {"name": "e", "prefixes": ["a", "b"], "method": None},
        {"name": "e", "prefixes": ["a", "b"], "extra": 1},
        {"name": ["e"], "prefixes": ["a", "b"]},
        {"name": "e", "prefixes": {"a": "b"}},
        [],
        "panel",
        None,
    ],
)
def test_weird_ensemble_bodies_are_4xx_and_store_nothing(
    client: TestClient, tenant: TenantAuth, adapters: dict[str, Path], body: Any
) -> None:
    upload_members(client, tenant, adapters)
    headers = {**tenant.headers, "Content-Type": "application/json"}
    # json.dumps writes a lone surrogate as the escape \ud800, as a hostile client may.
    response = client.post("/v1/ensembles", content=json.dumps(body), headers=headers)
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    assert isinstance(response.json()["error"]["message"], str)
    assert client.get("/v1/ensembles", headers=tenant.headers).json() == {"data": []}


@pytest.mark.parametrize(
    "path", ["/v1/ensembles/alice/%00", "/v1/ensembles/alice/" + "x" * 5000, "/v1/ensembles/a/b/c"]
)
def test_weird_ensemble_paths_are_4xx(client: TestClient, tenant: TenantAuth, path: str) -> None:
    for method in ("GET", "DELETE"):
        response = client.request(method, path, headers=tenant.headers)
        assert 400 <= response.status_code < 500, (method, response.status_code, response.text)


def test_a_mean_ends_at_the_context_of_its_longest_member(
    make_client: MakeClient, adapters: dict[str, Path]
) -> None:
    with make_client(max_len=24) as client:
        alice = create_tenant(client, "alice")
        upload_members(client, alice, adapters)
        lengths = {}
        for name in ("a", "b", "c"):
            single = generate(client, alice, prefix=name, max_new_tokens=64, ignore_eos=True)
            assert single.json()["finish_reason"] == "length", single.text
            lengths[name] = len(single.json()["token_ids"])
        assert len(set(lengths.values())) > 1  # the members' prefixes differ in length
        mean = generate(client, alice, prefixes=["a", "b", "c"], ensemble="mean",
                        max_new_tokens=64, ignore_eos=True)  # fmt: skip
        assert mean.status_code == 200, mean.text
        assert mean.json()["finish_reason"] == "length"
        assert len(mean.json()["token_ids"]) == min(lengths.values())
        assert_nothing_held(client)


def test_an_ensemble_larger_than_the_tenants_pinned_share_still_runs_alone(
    make_client: MakeClient,
    adapters: dict[str, Path],
    loaded: LoadedModel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One request of a tenant that holds nothing else may always run, however large its prefix
    (server/api/pins.py); an ensemble is one request, so the same holds for all its members
    together. Otherwise an ensemble over the share would get a 429 that no retry ever clears."""
    with make_client() as probe:
        who = create_tenant(probe, "alice")
        sizes = [
            upload(probe, who, peft_files(adapters[kind]), name=name).json()["bytes"]
            for name, kind in [("a", "prefix"), ("b", "prompt"), ("c", "p_tuning")]
        ]
    pool = 100 * sum(sizes)
    share = 1.5 * max(sizes) / pool  # any one member fits, no two together
    with make_client(device_pool_bytes=pool, max_pinned_share_per_tenant=share) as client:
        alice, bob = create_tenant(client, "alice"), create_tenant(client, "bob")
        upload_members(client, alice, adapters)
        assert upload(client, bob, peft_files(adapters["prompt"]), name="own").status_code == 201
        response = generate(client, alice, prefixes=["a", "b", "c"])
        assert response.status_code == 200, response.text
        mean = generate(client, alice, prefixes=["a", "b"], ensemble="mean")
        assert mean.status_code == 200, mean.text
        mine = generate(client, bob, prefix="own")
        assert mine.json()["token_ids"] == alone(loaded, PROMPT, peft_files(adapters["prompt"]), 6)
        assert_nothing_held(client)

        # Beside another of alice's requests the share holds as before: 429, nothing left held.
        assert sizes[2] + sizes[0] > 1.5 * max(sizes)  # "c" and "a" together are over
        stalled = StalledEngine(services(client).engine, monkeypatch)
        single = {"prompt": PROMPT, "max_new_tokens": 2, "temperature": 0, "prefix": "c"}
        with in_background(client, "/v1/generate", single, alice.headers) as held:
            try:
                assert stalled.stepping.wait(20)
                pinned = metric(client, "prefix_server_pool_pinned_bytes")
                over = generate(client, alice, prefixes=["a", "b"])
                assert_error(over, 429, "overloaded")
                assert metric(client, "prefix_server_pool_pinned_bytes") == pinned
            finally:
                stalled.go()
        assert held["response"].status_code == 200
        assert_nothing_held(client)


def test_more_prompts_on_an_ensemble_than_the_tenant_may_queue_is_400(
    make_client: MakeClient, adapters: dict[str, Path]
) -> None:
    """Each prompt queues one row per member: three prompts on three members are nine rows,
    and a tenant that may queue four (one group of three running) could never have them all
    accepted; a 429 would invite retries that can never succeed."""
    with make_client(max_waiting_per_tenant=4) as client:
        alice = create_tenant(client, "alice")
        upload_members(client, alice, adapters)
        stored = {"name": "panel", "prefixes": ["a", "b", "c"]}
        assert client.post("/v1/ensembles", json=stored, headers=alice.headers).status_code == 201
        body = {"model": "panel", "prompt": [[5, 6], [7, 8], [9, 10]], "max_tokens": 3}
        response = client.post("/v1/completions", json=body, headers=alice.headers)
        assert_error(response, 400, "prompt", "at most 1")
        assert_nothing_held(client)
        body["prompt"] = [[5, 6]]
        assert client.post("/v1/completions", json=body, headers=alice.headers).status_code == 200


def test_one_name_raced_as_an_ensemble_and_as_a_prefix_is_one_or_the_other(
    client: TestClient, tenant: TenantAuth, adapters: dict[str, Path]
) -> None:
    upload_members(client, tenant, adapters)
    files = peft_files(adapters["prefix"])

    def as_ensemble() -> int:
        body = {"name": "x", "prefixes": ["a", "b"]}
        return client.post("/v1/ensembles", json=body, headers=tenant.headers).status_code

    def as_prefix() -> int:
        return upload(client, tenant, files, name="x").status_code

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(as_ensemble if i % 2 else as_prefix) for i in range(8)]
        statuses = [f.result(timeout=60) for f in futures]
    assert statuses.count(201) == 1, statuses
    assert set(statuses) == {201, 409}, statuses
    ensembles = client.get("/v1/ensembles", headers=tenant.headers).json()["data"]
    prefix = client.get("/v1/prefixes/alice/x", headers=tenant.headers)
    assert (len(ensembles) == 1) != (prefix.status_code == 200)


def test_the_ensemble_quota_holds_under_concurrent_creation(
    make_client: MakeClient, adapters: dict[str, Path]
) -> None:
    with make_client(max_ensembles_per_tenant=2) as client:
        alice = create_tenant(client, "alice")
        upload_members(client, alice, adapters)

        def create(i: int) -> Any:
            body = {"name": f"e{i}", "prefixes": ["a", "b"]}
            return client.post("/v1/ensembles", json=body, headers=alice.headers)

        with ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(create, range(6)))
        assert sorted(r.status_code for r in responses) == [201, 201, 422, 422, 422, 422]
        for response in responses:
            if response.status_code == 422:
                assert response.json()["error"]["type"] == "quota_exceeded"
        assert len(client.get("/v1/ensembles", headers=alice.headers).json()["data"]) == 2


def test_a_stored_vote_streamed_through_openai_routes_is_400_naming_stream(words: Any) -> None:
    client, alice, _ = words
    stored = {"name": "panel", "prefixes": ["a", "b"], "method": "vote"}
    assert client.post("/v1/ensembles", json=stored, headers=alice.headers).status_code == 201
    for path, body in [
        ("/v1/completions", {"prompt": "w5 w6"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w5"}]}),
    ]:
        request = {"model": "panel", "max_tokens": 3, "stream": True, **body}
        error = assert_error(client.post(path, json=request, headers=alice.headers), 400, "mean")
        assert error["field"] == "stream"
        assert (
            client.post(path, json={**request, "stream": False}, headers=alice.headers).status_code
            == 200
        )
    assert_nothing_held(client)


def test_a_public_ensemble_whose_member_is_made_private_fails_for_others_only(
    client: TestClient, tenant: TenantAuth, adapters: dict[str, Path]
) -> None:
    bob = create_tenant(client, "bob")
    files = peft_files(adapters["prefix"])
    for name in ("shared-a", "shared-b"):
        assert upload(client, tenant, files, name=name, visibility="public").status_code == 201
    stored = {"name": "open", "prefixes": ["shared-a", "shared-b"], "visibility": "public"}
    assert client.post("/v1/ensembles", json=stored, headers=tenant.headers).status_code == 201
    assert generate(client, bob, prefix="alice/open").status_code == 200
    private = upload(client, tenant, files, name="shared-b", visibility="private", overwrite="true")
    assert private.status_code in (200, 201), private.text
    error = assert_error(generate(client, bob, prefix="alice/open"), 404, "alice/open", "shared-b")
    assert error["type"] == "not_found"
    assert generate(client, tenant, prefix="open").status_code == 200  # still hers to use
    assert_nothing_held(client)
