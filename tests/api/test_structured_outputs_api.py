"""Structured outputs over HTTP: OpenAI's `response_format` and the `structured_outputs` field on
every generation route, in every mode (stream, n, ensembles), exact against transformers with
llguidance's own mask while another tenant's request runs beside it; refusals that name the
problem; hostile constraints that cost their sender a 400 or a bounded run, nobody else anything."""

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
    TenantAuth,
    assert_error,
    create_tenant,
    in_background,
    peft_files,
    upload,
)
from tests.grammar_support import LABELS, PERSON, GrammarProcessor, tiny_smol, valid
from tests.integration.test_structured_outputs import NEW_TOKENS, reference
from tests.tiny import make_adapter, word_tokenizer

COLOURS = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def smol() -> LoadedModel:
    return tiny_smol()


@pytest.fixture(scope="module")
def smol_adapter(smol: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("smol-adapter") / "prefix"
    make_adapter(smol.model, "prefix", 4, folder, seed=3)
    return folder


@pytest.fixture
def served(
    make_client: MakeClient, smol: LoadedModel, smol_adapter: Path
) -> Iterator[tuple[TestClient, TenantAuth, TenantAuth]]:
    """The tiny SmolLM2-vocabulary model served; alice and bob each own the same adapter."""
    with make_client(model=smol, max_len=256) as client:
        alice, bob = create_tenant(client, "alice"), create_tenant(client, "bob")
        for who, name in ((alice, "task"), (alice, "task2"), (bob, "task")):
            files = peft_files(smol_adapter)
            assert upload(client, who, files, name=name).status_code == 201
        yield client, alice, bob


def victim_body(prompt: list[int]) -> dict[str, Any]:
    return {"prompt": prompt, "prefix": "task", "max_new_tokens": NEW_TOKENS, "temperature": 0}


def test_response_format_json_schema_is_exact_beside_another_tenant(
    served: tuple[TestClient, TenantAuth, TenantAuth], smol: LoadedModel, smol_adapter: Path
) -> None:
    client, alice, bob = served
    prompt = smol.tokenizer.encode("Describe a person:")
    victim_prompt = smol.tokenizer.encode("Tell me a story.")
    body = {
        "model": "alice/task",
        "prompt": prompt,
        "max_tokens": NEW_TOKENS,
        "temperature": 0,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON, "strict": True},
        },
    }
    with in_background(client, "/v1/generate", victim_body(victim_prompt), bob.headers) as other:
        response = client.post("/v1/completions", json=body, headers=alice.headers)
    assert response.status_code == 200, response.text
    (choice,) = response.json()["choices"]
    grammar = smol.grammars.compile("json_schema", PERSON)
    expected = reference(smol, smol_adapter, prompt, GrammarProcessor(grammar))
    assert choice["text"] == smol.tokenizer.decode(expected, skip_special_tokens=True)
    if choice["finish_reason"] == "stop":
        assert valid("json_schema", PERSON, choice["text"])
    assert other["response"].status_code == 200
    assert other["response"].json()["token_ids"] == reference(
        smol, smol_adapter, victim_prompt, None
    )


@pytest.mark.parametrize(
    ("constraint", "kind", "value"),
    [
        ({"choice": COLOURS}, "choice", COLOURS),
        ({"regex": "[a-z]{2,5}-[0-9]{2}"}, "regex", "[a-z]{2,5}-[0-9]{2}"),
        ({"json": LABELS}, "json_schema", LABELS),
        ({"grammar": 'start: "yes" | "no" | "maybe"'}, "grammar", 'start: "yes" | "no" | "maybe"'),
    ],
)
def test_generate_structured_outputs_equal_transformers_with_the_same_mask(
    served: tuple[TestClient, TenantAuth, TenantAuth],
    smol: LoadedModel,
    smol_adapter: Path,
    constraint: dict[str, Any],
    kind: str,
    value: Any,
) -> None:
    client, alice, _ = served
    prompt = smol.tokenizer.encode("Pick one:")
    body = {
        "prompt": prompt,
        "prefix": "task",
        "max_new_tokens": NEW_TOKENS,
        "temperature": 0,
        "structured_outputs": constraint,
    }
    response = client.post("/v1/generate", json=body, headers=alice.headers)
    assert response.status_code == 200, response.text
    answer = response.json()
    grammar = smol.grammars.compile(kind, value)
    assert answer["token_ids"] == reference(smol, smol_adapter, prompt, GrammarProcessor(grammar))
    assert answer["finish_reason"] == "length" or valid(kind, value, answer["text"])


def test_chat_streams_n_choices_and_ensembles_stay_inside_the_constraint(
    served: tuple[TestClient, TenantAuth, TenantAuth],
) -> None:
    client, alice, _ = served
    messages = [{"role": "user", "content": "Which colour?"}]
    constraint = {"structured_outputs": {"choice": COLOURS}}
    chat = {"model": "alice/task", "messages": messages, "max_tokens": 8, **constraint}
    response = client.post(
        "/v1/chat/completions", json={**chat, "n": 3, "seed": 7}, headers=alice.headers
    )
    assert response.status_code == 200, response.text
    for choice in response.json()["choices"]:
        assert choice["message"]["content"] in COLOURS, choice

    whole = client.post(
        "/v1/chat/completions", json={**chat, "temperature": 0}, headers=alice.headers
    )
    streamed = client.post(
        "/v1/chat/completions",
        json={**chat, "temperature": 0, "stream": True},
        headers=alice.headers,
    )
    deltas = [
        json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
        for line in streamed.text.splitlines()
        if line.startswith("data: {")
    ]
    assert "".join(deltas) == whole.json()["choices"][0]["message"]["content"] in COLOURS

    for method in ("vote", "mean"):
        body = {
            "prompt": "Which colour?",
            "prefixes": ["task", "task2"],
            "ensemble": method,
            "max_new_tokens": 8,
            "temperature": 0,
            **constraint,
        }
        answer = client.post("/v1/generate", json=body, headers=alice.headers)
        assert answer.status_code == 200, answer.text
        assert answer.json()["text"] in COLOURS, (method, answer.json())


def test_chat_response_format_json_object_answers_json(
    served: tuple[TestClient, TenantAuth, TenantAuth],
) -> None:
    client, alice, _ = served
    body = {
        "model": "alice/task",
        "messages": [{"role": "user", "content": "Answer in JSON."}],
        "max_tokens": 48,
        "temperature": 0,
        "response_format": {"type": "json_object"},
    }
    response = client.post("/v1/chat/completions", json=body, headers=alice.headers)
    assert response.status_code == 200, response.text
    (choice,) = response.json()["choices"]
    content = choice["message"]["content"]
    assert content.startswith("{"), content
    if choice["finish_reason"] == "stop":
        assert isinstance(json.loads(content), dict)


@pytest.mark.parametrize(
    ("path", "extra", "status", "words"),
    [
        (
            "/v1/generate",
            {"structured_outputs": {"choice": ["a"], "regex": "a"}},
            422,
            ["exactly one"],
        ),
        ("/v1/generate", {"structured_outputs": {"guided_json": {}}}, 422, ["guided_json"]),
        ("/v1/generate", {"guided_json": {"type": "object"}}, 422, ["guided_json"]),
        ("/v1/completions", {"guided_json": {"type": "object"}}, 400, ["guided_json"]),
        (
            "/v1/generate",
            {"structured_outputs": {"regex": "(a|b"}},
            400,
            ["structured_outputs", "regex"],
        ),
        ("/v1/generate", {"structured_outputs": {"grammar": "start: foo"}}, 400, ["unknown name"]),
        (
            "/v1/completions",
            {"response_format": {"type": "json_schema"}},
            422,
            ["json_schema"],
        ),
        (
            "/v1/completions",
            {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
            400,
            ["one constraint"],
        ),
        (
            "/v1/generate",
            {"structured_outputs": {"regex": "a"}, "ignore_eos": True},
            400,
            ["ignore_eos"],
        ),
        (
            "/v1/generate",
            {"structured_outputs": {"regex": "a+"}, "min_tokens": 2},
            400,
            ["min_tokens"],
        ),
    ],
)
def test_a_constraint_that_cannot_be_honoured_is_refused_never_ignored(
    served: tuple[TestClient, TenantAuth, TenantAuth],
    path: str,
    extra: dict[str, Any],
    status: int,
    words: list[str],
) -> None:
    client, alice, _ = served
    base: dict[str, Any] = (
        {"prompt": "Hi", "max_new_tokens": 4}
        if path == "/v1/generate"
        else {"model": "alice/task", "prompt": "Hi", "max_tokens": 4}
    )
    response = client.post(path, json={**base, **extra}, headers=alice.headers)
    assert_error(response, status, *words)


def nested(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema, "maxItems": 2}
    return schema


@pytest.mark.parametrize(
    "constraint",
    [
        {"json": nested(400)},  # deeply nested
        {
            "json": {
                "type": "object",
                "properties": {f"p{i}": {"type": "string"} for i in range(3000)},
            }
        },
        {"regex": "(a|aa)*(b|bb)*c" * 20},  # pathological alternations
        {"grammar": 'start: "a" start'},  # no finite answer
        {"choice": [f"label-{i}" for i in range(256)]},
    ],
    ids=["deep", "huge", "regex", "endless", "many-choices"],
)
def test_hostile_constraints_cost_their_sender_alone(
    served: tuple[TestClient, TenantAuth, TenantAuth],
    smol: LoadedModel,
    smol_adapter: Path,
    constraint: dict[str, Any],
) -> None:
    client, alice, bob = served
    victim_prompt = smol.tokenizer.encode("Tell me a story.")
    body = {"prompt": "Go:", "max_new_tokens": 16, "structured_outputs": constraint}
    with in_background(client, "/v1/generate", victim_body(victim_prompt), bob.headers) as other:
        response = client.post("/v1/generate", json=body, headers=alice.headers)
    # Refused at once, or run until its own limits: the parser's (422, its answer cut short)
    # or max_new_tokens.
    assert response.status_code in (200, 400, 422), response.text
    if response.status_code == 400:
        assert_error(response, 400, "structured_outputs")
    elif response.status_code == 422:
        assert_error(response, 422, "constraint could not be followed")
    else:
        assert response.json()["finish_reason"] in ("stop", "length")
    assert other["response"].status_code == 200
    assert other["response"].json()["token_ids"] == reference(
        smol, smol_adapter, victim_prompt, None
    )


def test_a_grammar_that_outgrows_its_parser_fails_its_own_request_with_422(
    served: tuple[TestClient, TenantAuth, TenantAuth], smol: LoadedModel, smol_adapter: Path
) -> None:
    """`start: "a" start` has no finite answer: its parser runs past its per-token limits after
    the first token, and that request alone fails, with what happened; bob's runs on exactly."""
    client, alice, bob = served
    victim_prompt = smol.tokenizer.encode("Tell me a story.")
    body = {
        "prompt": "Go:",
        "max_new_tokens": 16,
        "structured_outputs": {"grammar": 'start: "a" start'},
    }
    with in_background(client, "/v1/generate", victim_body(victim_prompt), bob.headers) as other:
        response = client.post("/v1/generate", json=body, headers=alice.headers)
    assert_error(response, 422, "constraint could not be followed", "too many items")
    assert response.json()["error"]["type"] == "constraint_failed"
    assert other["response"].json()["token_ids"] == reference(
        smol, smol_adapter, victim_prompt, None
    )
    again = client.post(
        "/v1/generate",
        json={**body, "structured_outputs": {"choice": COLOURS}},
        headers=alice.headers,
    )
    assert again.status_code == 200 and again.json()["text"] in COLOURS, again.text


def test_a_model_whose_tokenizer_llguidance_cannot_read_refuses_constraints_with_400(
    make_client: MakeClient, loaded: LoadedModel
) -> None:
    """A word-level tokenizer has no byte-level decoder to map tokens to bytes: every
    constraint is refused with what is missing, and unconstrained requests still run."""
    worded = wrap_model(loaded.model, word_tokenizer(), "tiny-words")
    with make_client(model=worded) as client:
        tenant = create_tenant(client, "alice")
        constrained = [
            ("/v1/generate", {"prompt": "w1 w2", "structured_outputs": {"regex": "0"}}),
            (
                "/v1/completions",
                {"model": "tiny-words", "prompt": "w1", "response_format": {"type": "json_object"}},
            ),
        ]
        for path, body in constrained:
            response = client.post(path, json=body, headers=tenant.headers)
            assert_error(response, 400, "tokenizer")
        plain = {"prompt": "w1 w2", "max_new_tokens": 2}
        assert client.post("/v1/generate", json=plain, headers=tenant.headers).status_code == 200
