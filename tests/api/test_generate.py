"""POST /v1/generate: the tokens equal the engine's run alone, streamed or not; every invalid
request is a 4xx naming its field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from prefixes import PrefixKind, RawPrefix, write_native
from server.models import LoadedModel, wrap_model
from tests.api.conftest import (
    NUM_VIRTUAL_TOKENS,
    Files,
    MakeClient,
    Response,
    TenantAuth,
    alone,
    assert_error,
    create_tenant,
    peft_files,
    upload,
)
from tests.tiny import ADAPTER_KINDS


def sse_events(response: Response) -> list[dict[str, Any]]:
    """The JSON events of a server-sent-events body, checking it ends with `data: [DONE]`."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    blocks = [b for b in response.text.split("\n\n") if b.strip()]
    assert all(b.startswith("data: ") for b in blocks), blocks
    payloads = [b.removeprefix("data: ") for b in blocks]
    assert payloads[-1] == "[DONE]" and "[DONE]" not in payloads[:-1]
    return [json.loads(p) for p in payloads[:-1]]


@pytest.fixture(scope="module")
def native_prompt(loaded: LoadedModel) -> Files:
    tensor = torch.randn(5, loaded.spec.hidden_size, generator=torch.Generator().manual_seed(3))
    data = write_native(RawPrefix(PrefixKind.PROMPT_TUNING, tensor))
    return [("files", ("soft.safetensors", data))]


@pytest.mark.parametrize("kind", [None, *ADAPTER_KINDS, "native"])
def test_generate_equals_the_engine_alone_streamed_or_not(
    client: TestClient,
    tenant: TenantAuth,
    adapters: dict[str, Path],
    loaded: LoadedModel,
    native_prompt: Files,
    kind: str | None,
) -> None:
    files = None
    body: dict[str, Any] = {"prompt": [5, 6, 7], "max_new_tokens": 6, "temperature": 0}
    if kind is not None:
        files = native_prompt if kind == "native" else peft_files(adapters[kind])
        assert upload(client, tenant, files, name="style").status_code == 201
        body["prefix"] = "alice/style"
    expected = alone(loaded, [5, 6, 7], files, 6)

    response = client.post("/v1/generate", json=body, headers=tenant.headers)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["token_ids"] == expected
    assert result["finish_reason"] == "length"
    assert result["text"] == ""  # the tiny model has no tokenizer
    prefix_tokens = 0 if kind is None else NUM_VIRTUAL_TOKENS.get(kind, 5)
    assert result["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 6,
        "prefix_tokens": prefix_tokens,
        "total_tokens": 9,
    }

    streamed = client.post("/v1/generate", json={**body, "stream": True}, headers=tenant.headers)
    events = sse_events(streamed)
    assert [t for e in events for t in e["token_ids"]] == expected
    assert all(e["finish_reason"] is None for e in events[:-1])
    assert events[-1]["finish_reason"] == "length"
    assert events[-1]["usage"] == result["usage"]
    assert all("usage" not in e for e in events[:-1])


def test_the_prefix_changes_the_output(
    client: TestClient, tenant: TenantAuth, adapters: dict[str, Path]
) -> None:
    assert upload(client, tenant, peft_files(adapters["prefix"]), name="p").status_code == 201
    body = {"prompt": [9, 8, 7, 6], "max_new_tokens": 8, "temperature": 0}
    plain = client.post("/v1/generate", json=body, headers=tenant.headers).json()
    styled = client.post(
        "/v1/generate", json={**body, "prefix": "p"}, headers=tenant.headers
    ).json()  # an own prefix by its bare name
    assert plain["token_ids"] != styled["token_ids"]
    assert styled["usage"]["prefix_tokens"] == NUM_VIRTUAL_TOKENS["prefix"]


def test_seeded_sampling_equals_the_engine_alone(
    client: TestClient, tenant: TenantAuth, adapters: dict[str, Path], loaded: LoadedModel
) -> None:
    files = peft_files(adapters["p_tuning"])
    assert upload(client, tenant, files, name="p").status_code == 201
    sampling = {"temperature": 0.8, "top_p": 0.9, "top_k": 50, "seed": 1234}
    body = {"prompt": [3, 1, 4], "prefix": "alice/p", "max_new_tokens": 8, **sampling}
    first = client.post("/v1/generate", json=body, headers=tenant.headers).json()
    again = client.post("/v1/generate", json=body, headers=tenant.headers).json()
    assert (
        first["token_ids"] == again["token_ids"] == alone(loaded, [3, 1, 4], files, 8, **sampling)
    )


def test_default_max_new_tokens_and_ignore_eos(client: TestClient, tenant: TenantAuth) -> None:
    result = client.post(
        "/v1/generate", json={"prompt": [1], "ignore_eos": True}, headers=tenant.headers
    ).json()
    assert len(result["token_ids"]) == 64 and result["finish_reason"] == "length"


INVALID: list[tuple[dict[str, Any], int, tuple[str, ...]]] = [
    ({"temperature": -0.1}, 422, ("temperature",)),
    ({"temperature": "hot"}, 422, ("temperature",)),
    ({"top_p": 0}, 422, ("top_p",)),
    ({"top_p": 1.01}, 422, ("top_p",)),
    ({"top_p": -1}, 422, ("top_p",)),
    ({"top_k": -1}, 422, ("top_k",)),
    ({"max_new_tokens": 0}, 400, ("max_new_tokens", "prompt_logprobs")),
    ({"logprobs": 21}, 422, ("logprobs",)),
    ({"prompt_logprobs": -1}, 422, ("prompt_logprobs",)),
    ({"logit_bias": {"400": 2}}, 400, ("logit_bias", "384", "400")),
    ({"logit_bias": {"2": -100.5}}, 422, ("logit_bias",)),
    ({"repetition_penalty": 11}, 422, ("repetition_penalty",)),
    ({"presence_penalty": -2.01}, 422, ("presence_penalty",)),
    ({"n": 2}, 422, ("n",)),  # an OpenAI field: one answer here
    ({"max_new_tokens": -5}, 422, ("max_new_tokens",)),
    ({"max_new_tokens": 65}, 400, ("max_new_tokens", "64", "65")),
    ({"seed": -1}, 422, ("seed",)),
    ({"stop": [""]}, 422, ("stop",)),
    ({"stop": ["x"] * 17}, 422, ("stop", "16")),
    ({"prompt": [1, 384]}, 400, ("prompt", "384")),
    ({"prompt": [10**30]}, 400, ("prompt",)),
    ({"prompt": [-1]}, 422, ("prompt",)),
    ({"prompt": [1.5]}, 422, ("prompt",)),
    ({"prompt": [1] * 128}, 400, ("prompt", "128")),
    ({"prompt": [1] * 500}, 400, ("prompt",)),
    ({"prompt": []}, 400, ("prompt",)),
    ({"prompt": None}, 422, ("prompt",)),
    ({"prompt": "hello"}, 400, ("prompt", "tokenizer")),
    ({"prompt": ""}, 400, ("prompt",)),
    ({"unknown": 1}, 422, ("unknown",)),
    ({"max_tokens": 5}, 422, ("max_tokens",)),  # the OpenAI name, not this endpoint's
    ({"prefix": "../etc"}, 422, ("owner", "..")),
    ({"prefix": "Alice/Style"}, 422, ("owner",)),
    ({"prefix": "a/b/c"}, 422, ("prefix",)),
    ({"prefix": 7}, 422, ("prefix",)),
]


@pytest.mark.parametrize(
    ("change", "status", "words"), INVALID, ids=[json.dumps(c)[:40] for c, _, _ in INVALID]
)
def test_invalid_requests_are_4xx_naming_the_field(
    client: TestClient, tenant: TenantAuth, change: dict, status: int, words: tuple[str, ...]
) -> None:
    body = {"prompt": [1, 2], "max_new_tokens": 2, **change}
    assert_error(client.post("/v1/generate", json=body, headers=tenant.headers), status, *words)
    streamed = client.post("/v1/generate", json={**body, "stream": True}, headers=tenant.headers)
    assert_error(streamed, status, *words)  # refused before the stream starts


def test_the_prompt_and_prefix_together_must_fit_the_context(
    client: TestClient, tenant: TenantAuth, loaded: LoadedModel
) -> None:
    soft = write_native(RawPrefix(PrefixKind.PROMPT_TUNING, torch.randn(100, 64)))
    assert (
        upload(client, tenant, [("files", ("s.safetensors", soft))], name="long").status_code == 201
    )
    body = {"prompt": [1] * 28, "prefix": "long", "max_new_tokens": 1}  # 100 + 28 = max_len
    assert_error(
        client.post("/v1/generate", json=body, headers=tenant.headers), 400, "prompt", "128"
    )
    ok = client.post("/v1/generate", json={**body, "prompt": [1] * 27}, headers=tenant.headers)
    assert ok.status_code == 200, ok.text
    # Room for one position only: generation stops at the end of the context.
    longer = {**body, "prompt": [1] * 27, "max_new_tokens": 10}
    result = client.post("/v1/generate", json=longer, headers=tenant.headers).json()
    assert 1 <= len(result["token_ids"]) < 10 and result["finish_reason"] == "length"


def test_malformed_json_is_422_naming_the_body(client: TestClient, tenant: TenantAuth) -> None:
    headers = {**tenant.headers, "content-type": "application/json"}
    response = client.post("/v1/generate", content=b'{"prompt": [1, 2', headers=headers)
    error = assert_error(response, 422, "malformed JSON")
    assert error["details"] == [{"field": "body", "message": "malformed JSON"}]


def test_validation_errors_list_every_field(client: TestClient, tenant: TenantAuth) -> None:
    body = {"prompt": [1], "temperature": -1, "top_k": -1, "bogus": True}
    error = assert_error(client.post("/v1/generate", json=body, headers=tenant.headers), 422)
    assert {d["field"] for d in error["details"]} == {"temperature", "top_k", "bogus"}


@pytest.mark.parametrize("top_k", [2**63, 10**30])
def test_a_huge_top_k_is_a_4xx_naming_top_k(
    client: TestClient, tenant: TenantAuth, top_k: int
) -> None:
    body = {"prompt": [1, 2], "max_new_tokens": 2, "top_k": top_k}
    assert_error(client.post("/v1/generate", json=body, headers=tenant.headers), 422, "top_k")


def test_unset_sampling_fields_take_the_models_generation_config(
    make_client: MakeClient, loaded: LoadedModel
) -> None:
    """As vLLM does: what a request leaves unset comes from the model's generation_config.json,
    where its authors set it; otherwise OpenAI's defaults (temperature 1)."""
    import copy

    model = copy.deepcopy(loaded.model)
    model.generation_config.temperature = 0.5
    model.generation_config.top_k = 7
    configured = wrap_model(model, None, "tiny-configured")
    assert configured.generation_defaults == {"temperature": 0.5, "top_k": 7.0}
    body = {"prompt": [1, 2, 3], "max_new_tokens": 12, "seed": 11}

    def tokens(client: TestClient, who: TenantAuth, **fields: Any) -> list[int]:
        response = client.post("/v1/generate", json={**body, **fields}, headers=who.headers)
        assert response.status_code == 200, response.text
        return list(response.json()["token_ids"])

    with make_client(model=configured) as client:
        alice = create_tenant(client, "alice")
        unset = tokens(client, alice)
        assert unset == tokens(client, alice, temperature=0.5, top_k=7)
        assert unset != tokens(client, alice, temperature=1.0, top_k=0)
        assert tokens(client, alice, temperature=0) == alone(configured, [1, 2, 3], None, 12)
    with make_client() as client:  # no generation_config values: OpenAI's defaults
        alice = create_tenant(client, "alice")
        assert tokens(client, alice) == tokens(client, alice, temperature=1.0, top_p=1.0)
