"""Prompt ensembles over HTTP: `prefixes` + `ensemble` on /v1/generate, stored ensembles on
/v1/ensembles used as `prefix` or as an OpenAI `model`, and every bad input a clear 4xx.

The references are the engine run alone: each vote candidate equals its prefix's request alone,
a mean equals the members' lockstep group alone (tests/integration/test_ensemble_engine.py holds
both to PEFT)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from prefixes import read_upload
from server.engine.llm import LLM
from server.engine.request import Request, RequestGroup, SamplingParams
from server.models import LoadedModel, wrap_model
from tests.api.conftest import (
    NUM_VIRTUAL_TOKENS,
    MakeClient,
    NewTenant,
    TenantAuth,
    Upload,
    alone,
    assert_error,
    create_tenant,
    peft_files,
    upload,
)
from tests.api.test_generate import sse_events
from tests.tiny import word_tokenizer

PROMPT = [5, 17, 42, 99]
N = 6


def mean_alone(loaded: LoadedModel, prompt: list[int], folders: list[Path], n: int) -> list[int]:
    """The members' lockstep group run alone in the engine: the mean's reference."""
    llm = LLM(loaded, num_slots=len(folders), max_len=128)
    params = SamplingParams(max_new_tokens=n, temperature=0)
    rows = [
        Request(prompt, params, prefix=loaded.compile(read_upload(_files(f)), 256)) for f in folders
    ]
    llm.add(RequestGroup(rows, lockstep=True).leader)
    while llm.has_work:
        llm.step()
    return list(rows[0].output_token_ids)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def generate(client: TestClient, who: TenantAuth, **body: Any):
    payload = {"prompt": PROMPT, "max_new_tokens": N, "temperature": 0, **body}
    return client.post("/v1/generate", json=payload, headers=who.headers)


@pytest.fixture
def members(tenant: TenantAuth, upload_adapter: Upload) -> list[str]:
    """Three of alice's prefixes: two with the same weights (they agree), one different."""
    upload_adapter(tenant, "a", "prefix")
    upload_adapter(tenant, "a-twin", "prefix")
    upload_adapter(tenant, "b", "prompt")
    return ["a", "a-twin", "alice/b"]


def test_a_vote_returns_every_candidate_and_the_majority_answer(
    client: TestClient,
    tenant: TenantAuth,
    members: list[str],
    adapters: dict[str, Path],
    loaded: LoadedModel,
) -> None:
    response = generate(client, tenant, prefixes=members, ensemble="vote")
    assert response.status_code == 200, response.text
    body = response.json()
    expected_a = alone(loaded, PROMPT, peft_files(adapters["prefix"]), N)
    expected_b = alone(loaded, PROMPT, peft_files(adapters["prompt"]), N)
    assert expected_a != expected_b
    candidates = body["ensemble"]["candidates"]
    assert [c["prefix"] for c in candidates] == ["alice/a", "alice/a-twin", "alice/b"]
    assert [c["token_ids"] for c in candidates] == [expected_a, expected_a, expected_b]
    assert all(c["mean_logprob"] <= 0 for c in candidates)
    assert candidates[0]["mean_logprob"] == pytest.approx(candidates[1]["mean_logprob"])
    # Two of three agree: their answer wins, whatever the log-probabilities say.
    assert body["token_ids"] == expected_a
    key = lambda ids: " ".join(map(str, ids))  # noqa: E731  (no tokenizer: votes on ids)
    assert body["ensemble"]["votes"] == {key(expected_a): 2, key(expected_b): 1}
    assert body["ensemble"]["method"] == "vote"
    assert body["ensemble"]["members"] == ["alice/a", "alice/a-twin", "alice/b"]


def test_a_tied_vote_goes_to_the_more_confident_candidate(
    client: TestClient, tenant: TenantAuth, members: list[str]
) -> None:
    body = generate(client, tenant, prefixes=["a", "b"], ensemble="vote").json()
    first, second = body["ensemble"]["candidates"]
    assert first["token_ids"] != second["token_ids"]
    confident = max((first, second), key=lambda c: c["mean_logprob"])
    assert body["token_ids"] == confident["token_ids"]


def test_a_vote_compares_texts_when_the_model_has_a_tokenizer(
    make_client: MakeClient, loaded: LoadedModel, adapters: dict[str, Path]
) -> None:
    with make_client(model=wrap_model(loaded.model, word_tokenizer(), "tiny-words")) as client:
        who = create_tenant(client, "alice")
        for name, kind in [("a", "prefix"), ("a2", "prefix"), ("b", "prompt")]:
            response = upload(client, who, peft_files(adapters[kind]), name=name)
            assert response.status_code == 201, response.text
        body = generate(client, who, prompt="w5 w17 w42", prefixes=["b", "a", "a2"]).json()
    candidates = body["ensemble"]["candidates"]
    assert candidates[1]["text"] == candidates[2]["text"] != candidates[0]["text"]
    assert body["text"] == candidates[1]["text"]
    assert body["ensemble"]["votes"] == {candidates[1]["text"]: 2, candidates[0]["text"]: 1}


def test_mean_decodes_one_answer_from_all_members_streamed_or_not(
    client: TestClient,
    tenant: TenantAuth,
    members: list[str],
    adapters: dict[str, Path],
    loaded: LoadedModel,
) -> None:
    expected = mean_alone(loaded, PROMPT, [adapters["prefix"], adapters["prompt"]], N)
    response = generate(client, tenant, prefixes=["a", "b"], ensemble="mean")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token_ids"] == expected
    assert body["ensemble"] == {"method": "mean", "members": ["alice/a", "alice/b"]}
    assert body["token_ids"] != alone(loaded, PROMPT, peft_files(adapters["prefix"]), N)
    streamed = client.post(
        "/v1/generate",
        json={"prompt": PROMPT, "max_new_tokens": N, "temperature": 0, "stream": True,
              "prefixes": ["a", "b"], "ensemble": "mean"},
        headers=tenant.headers,
    )  # fmt: skip
    events = sse_events(streamed)
    assert [t for e in events for t in e["token_ids"]] == expected
    assert events[-1]["finish_reason"] == "length"


def test_an_ensemble_beside_another_tenants_request_leaves_it_exact(
    client: TestClient,
    tenant: TenantAuth,
    members: list[str],
    new_tenant: NewTenant,
    upload_adapter: Upload,
    adapters: dict[str, Path],
    loaded: LoadedModel,
) -> None:
    bob = new_tenant("bob")
    upload_adapter(bob, "mine", "p_tuning")
    expected = alone(loaded, [3, 1, 4, 1, 5], peft_files(adapters["p_tuning"]), 12)
    answers: dict[str, Any] = {}

    def victim() -> None:
        body = {"prompt": [3, 1, 4, 1, 5], "max_new_tokens": 12, "temperature": 0,
                "prefix": "mine"}  # fmt: skip
        answers["bob"] = client.post("/v1/generate", json=body, headers=bob.headers)

    threads = [threading.Thread(target=victim)]
    threads[0].start()
    for method in ("vote", "mean"):
        response = generate(client, tenant, prefixes=["a", "b"], ensemble=method)
        assert response.status_code == 200, response.text
    threads[0].join()
    assert answers["bob"].status_code == 200, answers["bob"].text
    assert answers["bob"].json()["token_ids"] == expected


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"prefixes": ["a", "nope"]}, 404, ["nope", "not found"]),
        ({"prefixes": ["a", "bob/secret"]}, 404, ["bob/secret", "not found"]),
        ({"prefixes": ["a"]}, 400, ["prefixes", "2 to"]),
        ({"prefixes": ["a", "a-twin", "b", "c"]}, 400, ["prefixes", "2 to 3"]),
        ({"prefixes": ["a", "alice/a"]}, 400, ["prefixes", "distinct", "alice/a twice"]),
        ({"prefixes": ["a", "b"], "prefix": "a"}, 400, ["prefix", "not both"]),
        ({"prefixes": ["a", "b"], "stream": True}, 400, ["stream", "mean"]),
        ({"prefixes": ["a", "b"], "ensemble": "vote", "stream": True}, 400, ["stream"]),
        ({"prefix": "a", "ensemble": "mean"}, 400, ["ensemble", "prefixes"]),
        ({"prefixes": ["a", "b"], "ensemble": "median"}, 422, ["ensemble"]),
        ({"prefixes": "a"}, 422, ["prefixes"]),
    ],
)
def test_bad_ensembles_are_4xx_naming_the_problem(
    make_client: MakeClient,
    adapters: dict[str, Path],
    body: dict[str, Any],
    status: int,
    words: list[str],
) -> None:
    with make_client(max_ensemble_members=3) as client:
        alice, bob = create_tenant(client, "alice"), create_tenant(client, "bob")
        for who, name, kind in [(alice, "a", "prefix"), (alice, "a-twin", "prefix"),
                                (alice, "b", "prompt"), (bob, "secret", "prompt")]:  # fmt: skip
            assert upload(client, who, peft_files(adapters[kind]), name=name).status_code == 201
        error = assert_error(generate(client, alice, **body), status, *words)
        if "bob/secret" in words:
            assert "private" not in error["message"]  # nothing about bob's prefix revealed
        assert client.app.state.services.engine.in_flight == 0  # type: ignore[attr-defined]
        assert generate(client, alice, prefixes=["a", "b"]).status_code == 200  # still serving


def test_an_ensemble_larger_than_the_batch_is_refused(
    make_client: MakeClient, adapters: dict[str, Path]
) -> None:
    with make_client(num_slots=2, max_ensemble_members=4) as client:
        alice = create_tenant(client, "alice")
        for name in "abc":
            assert (
                upload(client, alice, peft_files(adapters["prefix"]), name=name).status_code == 201
            )
        response = generate(client, alice, prefixes=["a", "b", "c"])
        assert_error(response, 400, "prefixes", "at most 2 members")


def test_a_stored_ensemble_serves_as_prefix_and_as_openai_model(
    client: TestClient,
    tenant: TenantAuth,
    members: list[str],
    adapters: dict[str, Path],
    loaded: LoadedModel,
) -> None:
    created = client.post(
        "/v1/ensembles",
        json={"name": "panel", "prefixes": ["a", "b"], "method": "mean", "description": "two"},
        headers=tenant.headers,
    )
    assert created.status_code == 201, created.text
    info = created.json()
    assert info["id"] == "alice/panel" and info["prefixes"] == ["alice/a", "alice/b"]
    assert info["method"] == "mean" and info["visibility"] == "private"
    assert client.get("/v1/ensembles/alice/panel", headers=tenant.headers).json() == info
    assert client.get("/v1/ensembles", headers=tenant.headers).json() == {"data": [info]}

    expected = mean_alone(loaded, PROMPT, [adapters["prefix"], adapters["prompt"]], N)
    body = generate(client, tenant, prefix="panel").json()
    assert body["token_ids"] == expected
    assert body["ensemble"]["ensemble"] == "alice/panel"
    completion = client.post(
        "/v1/completions",
        json={"model": "alice/panel", "prompt": PROMPT, "max_tokens": N, "temperature": 0},
        headers=tenant.headers,
    )
    assert completion.status_code == 200, completion.text
    assert completion.json()["model"] == "alice/panel"
    models = client.get("/v1/models", headers=tenant.headers).json()["data"]
    assert "alice/panel" in [m["id"] for m in models]


def test_a_stored_ensemble_is_private_unless_public_and_fails_clearly_without_a_member(
    client: TestClient,
    tenant: TenantAuth,
    members: list[str],
    new_tenant: NewTenant,
    upload_adapter: Upload,
) -> None:
    bob = new_tenant("bob")
    for name in ("shared-a", "shared-b"):
        upload_adapter(tenant, name, "prefix", visibility="public")
    for name, prefixes, visibility in [("mine", ["a", "b"], "private"),
                                       ("open", ["shared-a", "shared-b"], "public")]:  # fmt: skip
        response = client.post(
            "/v1/ensembles",
            json={"name": name, "prefixes": prefixes, "visibility": visibility},
            headers=tenant.headers,
        )
        assert response.status_code == 201, response.text
    assert_error(client.get("/v1/ensembles/alice/mine", headers=bob.headers), 404, "not found")
    assert_error(generate(client, bob, prefix="alice/mine"), 404, "not found")
    assert [e["id"] for e in client.get("/v1/ensembles", headers=bob.headers).json()["data"]] == [
        "alice/open"
    ]
    assert generate(client, bob, prefix="alice/open").status_code == 200
    assert_error(client.delete("/v1/ensembles/alice/open", headers=bob.headers), 404)

    assert client.delete("/v1/prefixes/alice/shared-b", headers=tenant.headers).status_code == 204
    error = assert_error(generate(client, bob, prefix="alice/open"), 404, "alice/open", "shared-b")
    assert error["type"] == "not_found"
    assert client.delete("/v1/ensembles/alice/open", headers=tenant.headers).status_code == 204
    assert_error(client.get("/v1/ensembles/alice/open", headers=tenant.headers), 404)


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"name": "a", "prefixes": ["a", "b"]}, 409, ["alice/a", "prefix"]),
        ({"name": "e", "prefixes": ["a", "nope"]}, 404, ["nope"]),
        ({"name": "e", "prefixes": ["a", "b"], "visibility": "public"}, 400, ["public"]),
        ({"name": "e", "prefixes": ["a", "a"]}, 400, ["distinct"]),
        ({"name": "e", "prefixes": ["a", "b"], "method": "max"}, 422, ["method"]),
        ({"name": "Bad Name", "prefixes": ["a", "b"]}, 422, ["name"]),
    ],
)
def test_bad_stored_ensembles_are_refused_naming_the_problem(
    client: TestClient,
    tenant: TenantAuth,
    members: list[str],
    body: dict[str, Any],
    status: int,
    words: list[str],
) -> None:
    response = client.post("/v1/ensembles", json=body, headers=tenant.headers)
    assert_error(response, status, *words)
    assert client.get("/v1/ensembles", headers=tenant.headers).json() == {"data": []}


def test_ensembles_and_prefixes_share_names(
    client: TestClient, tenant: TenantAuth, members: list[str], adapters: dict[str, Path]
) -> None:
    body = {"name": "panel", "prefixes": ["a", "b"]}
    assert client.post("/v1/ensembles", json=body, headers=tenant.headers).status_code == 201
    assert_error(client.post("/v1/ensembles", json=body, headers=tenant.headers), 409, "exists")
    response = upload(client, tenant, peft_files(adapters["prefix"]), name="panel")
    assert_error(response, 409, "alice/panel", "ensemble")


def test_ensemble_metrics_count_requests_members_and_agreement(
    client: TestClient, tenant: TenantAuth, members: list[str]
) -> None:
    assert generate(client, tenant, prefixes=members).status_code == 200
    assert generate(client, tenant, prefixes=["a", "b"], ensemble="mean").status_code == 200
    text = client.get("/metrics").text
    assert 'prefix_server_ensemble_requests_total{method="vote"} 1.0' in text
    assert 'prefix_server_ensemble_requests_total{method="mean"} 1.0' in text
    assert 'prefix_server_ensemble_members_sum{method="vote"} 3.0' in text
    assert "prefix_server_ensemble_vote_agreement_count 1.0" in text
    assert "prefix_server_ensemble_vote_agreement_sum 0.666" in text
    assert "alice" not in text


@pytest.mark.parametrize(("method", "stream"), [("vote", False), ("mean", False), ("mean", True)])
def test_usage_counts_every_members_virtual_tokens(
    client: TestClient, tenant: TenantAuth, members: list[str], method: str, stream: bool
) -> None:
    response = generate(client, tenant, prefixes=members, ensemble=method, stream=stream)
    assert response.status_code == 200, response.text
    usage = sse_events(response)[-1]["usage"] if stream else response.json()["usage"]
    kinds = ["prefix", "prefix", "prompt"]  # the members' kinds
    assert usage["prefix_tokens"] == sum(NUM_VIRTUAL_TOKENS[kind] for kind in kinds)
