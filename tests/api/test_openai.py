"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.models import LoadedModel, wrap_model
from tests.api.conftest import (
    MakeClient,
    NewTenant,
    TenantAuth,
    Upload,
    alone,
    assert_error,
    create_tenant,
    peft_files,
)
from tests.api.test_generate import sse_events
from tests.tiny import word_tokenizer

BASE = "tiny-llama"


def test_completions_with_the_base_model_and_with_prefix_refs(
    client: TestClient, tenant: TenantAuth, upload_adapter: Upload
) -> None:
    upload_adapter(tenant, "style", "prompt")
    for model in (BASE, "alice/style", "style"):
        body = {"model": model, "prompt": [3, 4], "max_tokens": 4, "temperature": 0}
        response = client.post("/v1/completions", json=body, headers=tenant.headers)
        assert response.status_code == 200, response.text
        result = response.json()
        assert result["object"] == "text_completion" and result["model"] == model
        assert result["id"].startswith("cmpl-") and isinstance(result["created"], int)
        (choice,) = result["choices"]
        assert choice["index"] == 0 and isinstance(choice["text"], str)
        assert choice["finish_reason"] == "length" and choice["logprobs"] is None
        assert result["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}

        events = sse_events(
            client.post("/v1/completions", json={**body, "stream": True}, headers=tenant.headers)
        )
        assert {e["object"] for e in events} == {"text_completion"}
        assert {e["model"] for e in events} == {model} and len({e["id"] for e in events}) == 1
        assert "".join(e["choices"][0]["text"] for e in events) == choice["text"]
        assert [e["choices"][0]["finish_reason"] for e in events][-1] == "length"
        assert all(e["choices"][0]["finish_reason"] is None for e in events[:-1])


def test_max_tokens_defaults_to_16(client: TestClient, tenant: TenantAuth) -> None:
    body = {"model": BASE, "prompt": [1]}
    usage = client.post("/v1/completions", json=body, headers=tenant.headers).json()["usage"]
    assert usage["completion_tokens"] == 16


def test_a_list_of_prompts_gets_one_choice_each(client: TestClient, tenant: TenantAuth) -> None:
    body = {"model": BASE, "prompt": [[1, 2], [3]], "max_tokens": 2, "temperature": 0}
    result = client.post("/v1/completions", json=body, headers=tenant.headers).json()
    assert [c["index"] for c in result["choices"]] == [0, 1]
    assert result["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    streamed = client.post("/v1/completions", json={**body, "stream": True}, headers=tenant.headers)
    assert_error(streamed, 400, "prompt", "stream")


# With a tokenizer, the text shows which tokens were generated --------------------------------


@pytest.fixture
def worded(
    make_client: MakeClient, loaded: LoadedModel
) -> Iterator[tuple[TestClient, LoadedModel]]:
    """The same tiny model with a word tokenizer (token i is the word `w{i}`)."""
    model = wrap_model(loaded.model, word_tokenizer(), "tiny-words")
    with make_client(model=model) as client:
        yield client, model


def test_completion_text_is_the_engines_tokens_alone(
    worded: tuple[TestClient, LoadedModel], adapters: dict[str, Path]
) -> None:
    client, model = worded
    alice = create_tenant(client, "alice")
    files = peft_files(adapters["prefix"])
    assert (
        client.post(
            "/v1/prefixes", data={"name": "p"}, files=files, headers=alice.headers
        ).status_code
        == 201
    )
    tokenizer: Any = model.tokenizer
    for name, prefix_files in (("tiny-words", None), ("alice/p", files)):
        expected = tokenizer.decode(alone(model, [5, 6, 7], prefix_files, 5))
        for prompt in ([5, 6, 7], "w5 w6 w7"):
            body = {"model": name, "prompt": prompt, "max_tokens": 5, "temperature": 0}
            result = client.post("/v1/completions", json=body, headers=alice.headers).json()
            assert result["choices"][0]["text"] == expected, (name, prompt)
            events = sse_events(
                client.post("/v1/completions", json={**body, "stream": True}, headers=alice.headers)
            )
            assert "".join(e["choices"][0]["text"] for e in events) == expected
        generated = client.post(
            "/v1/generate",
            json={
                "prompt": "w5 w6 w7",
                "prefix": prefix_files and name,
                "max_new_tokens": 5,
                "temperature": 0,
            },
            headers=alice.headers,
        ).json()
        assert generated["text"] == expected


def test_chat_without_a_chat_template_is_400(worded: tuple[TestClient, LoadedModel]) -> None:
    client, _ = worded
    alice = create_tenant(client, "alice")
    for stream in (False, True):
        body = {
            "model": "tiny-words",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": stream,
        }
        response = client.post("/v1/chat/completions", json=body, headers=alice.headers)
        assert_error(response, 400, "messages", "chat template")


# Refusals -----------------------------------------------------------------------------------


REFUSED: list[tuple[dict[str, Any], int, tuple[str, ...]]] = [
    ({"n": 5}, 400, ("n:", "at most 4")),  # the test server's slots
    ({"n": 0}, 422, ("n",)),
    ({"logprobs": 21}, 422, ("logprobs",)),
    ({"logprobs": -1}, 422, ("logprobs",)),
    ({"max_tokens": 0}, 400, ("max_tokens", "echo")),
    ({"best_of": 3}, 400, ("best_of",)),
    ({"presence_penalty": 2.5}, 422, ("presence_penalty",)),
    ({"frequency_penalty": -3}, 422, ("frequency_penalty",)),
    ({"repetition_penalty": 0}, 422, ("repetition_penalty",)),
    ({"min_tokens": -1}, 422, ("min_tokens",)),
    ({"logit_bias": {"384": 1}}, 400, ("logit_bias", "384")),
    ({"logit_bias": {"5": 101}}, 422, ("logit_bias",)),
    ({"logit_bias": {"five": 1}}, 422, ("logit_bias", "five")),
    ({"logit_bias": {str(i): 1 for i in range(301)}}, 422, ("logit_bias",)),
    ({"stream_options": {"include_usage": True}}, 400, ("stream_options", "stream")),
    ({"stream": True, "stream_options": {"include_usagee": True}}, 422, ("include_usagee",)),
    ({"max_tokens": 65}, 400, ("max_new_tokens", "64")),
    ({"temperature": -1}, 422, ("temperature",)),
    ({"top_p": 0}, 422, ("top_p",)),
    ({"model": "nobody/nothing"}, 404, ("nobody/nothing", "not found")),
    ({"model": "nothing"}, 404, ("alice/nothing", "not found")),
    ({"model": "Not A Model"}, 422, ("not a model",)),
    ({"prompt": []}, 400, ("prompt",)),
    ({"prompt": [[1], []]}, 400, ("prompt",)),
    ({"prompt": [1, 384]}, 400, ("prompt", "384")),
    ({"prompt": "hello"}, 400, ("prompt", "tokenizer")),
    ({"prompt": [1] * 200}, 400, ("prompt", "128")),
]


@pytest.mark.parametrize(
    ("change", "status", "words"), REFUSED, ids=[json.dumps(c)[:40] for c, _, _ in REFUSED]
)
def test_completions_refusals(
    client: TestClient, tenant: TenantAuth, change: dict, status: int, words: tuple[str, ...]
) -> None:
    body = {"model": BASE, "prompt": [1], "max_tokens": 2, **change}
    error = assert_error(
        client.post("/v1/completions", json=body, headers=tenant.headers), status, *words
    )
    if status == 400 and "not supported" in error["message"]:
        assert error["field"] == next(iter(change))


def test_an_empty_model_is_not_the_base_model(client: TestClient, tenant: TenantAuth) -> None:
    body = {"model": "", "prompt": [1], "max_tokens": 2}
    assert client.post("/v1/completions", json=body, headers=tenant.headers).status_code in (
        404,
        422,
    )


def test_chat_on_the_tiny_model_is_400(client: TestClient, tenant: TenantAuth) -> None:
    body = {
        "model": BASE,
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
    }
    assert_error(
        client.post("/v1/chat/completions", json=body, headers=tenant.headers),
        400,
        "chat template",
    )
    assert_error(
        client.post("/v1/chat/completions", json={**body, "n": 9}, headers=tenant.headers),
        400,
        "n:",
    )
    assert_error(
        client.post("/v1/chat/completions", json={**body, "messages": []}, headers=tenant.headers),
        422,
        "messages",
    )


# Models -------------------------------------------------------------------------------------


def test_models_lists_the_base_model_and_every_usable_prefix(
    client: TestClient, new_tenant: NewTenant, upload_adapter: Upload
) -> None:
    alice, bob = new_tenant("alice"), new_tenant("bob")
    upload_adapter(alice, "mine", "prefix")
    upload_adapter(bob, "shared", "prompt", visibility="public")
    upload_adapter(bob, "secret", "prompt")
    listing = client.get("/v1/models", headers=alice.headers).json()
    assert listing["object"] == "list"
    base, *prefixes = listing["data"]
    assert base["id"] == BASE and base["object"] == "model" and base["owned_by"] == "system"
    assert sorted((m["id"], m["owned_by"]) for m in prefixes) == [
        ("alice/mine", "alice"),
        ("bob/shared", "bob"),
    ]
    assert all(m["object"] == "model" and isinstance(m["created"], int) for m in prefixes)
    bobs = {m["id"] for m in client.get("/v1/models", headers=bob.headers).json()["data"]}
    assert bobs == {BASE, "bob/shared", "bob/secret"}
    # Everything listed is usable as `model`.
    for model in [BASE, "alice/mine", "bob/shared"]:
        body = {"model": model, "prompt": [1], "max_tokens": 1}
        assert client.post("/v1/completions", json=body, headers=alice.headers).status_code == 200
