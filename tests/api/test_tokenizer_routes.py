"""vLLM's tokenizer routes: POST /tokenize, POST /detokenize, GET /tokenizer_info."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from tokenizers import processors

from server.api.schemas import MAX_TOKENIZE_CHARS
from server.models import LoadedModel, wrap_model
from tests.api.conftest import DEFAULT_SETTINGS, MakeClient, TenantAuth, assert_error, create_tenant
from tests.api.tuning import CHAT_TEMPLATE
from tests.tiny import tiny_config, word_tokenizer

MAX_LEN = DEFAULT_SETTINGS["max_len"]
VOCAB = tiny_config("llama").vocab_size
MESSAGES = [
    {"role": "user", "content": "w5 w6"},
    {"role": "assistant", "content": "w7"},
    {"role": "user", "content": "w8 w9 w10"},
]


def chat_tokenizer() -> Any:
    """The word tokenizer (token i is `w{i}`) with a chat template, and a BOS (`w1`) that
    `add_special_tokens` puts first."""
    tokenizer = word_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token = "w1", "w2", "w3"
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="w1 $A", special_tokens=[("w1", 1)]
    )
    return tokenizer


@pytest.fixture
def worded(make_client: MakeClient, loaded: LoadedModel) -> Iterator[tuple[TestClient, Any]]:
    """The tiny model with `chat_tokenizer()`, and alice."""
    tokenizer = chat_tokenizer()
    with make_client(model=wrap_model(loaded.model, tokenizer, "tiny-words")) as client:
        yield client, tokenizer


@pytest.fixture
def alice(worded: tuple[TestClient, Any]) -> TenantAuth:
    return create_tenant(worded[0], "alice")


def test_the_tokenizer_sets_a_bos_and_a_template() -> None:
    """What the tests below rely on: add_special_tokens changes the ids."""
    tokenizer = chat_tokenizer()
    assert tokenizer.encode("w5 w6 w200") == [1, 5, 6, 200]
    assert tokenizer.encode("w5 w6", add_special_tokens=False) == [5, 6]


def test_tokenize_then_detokenize_is_the_text(
    worded: tuple[TestClient, Any], alice: TenantAuth
) -> None:
    client, tokenizer = worded
    text = "w5 w6 w200 w383 w5"
    for model in ({}, {"model": "tiny-words"}, {"model": "alice/anything"}):
        response = client.post("/tokenize", json={**model, "prompt": text}, headers=alice.headers)
        assert response.status_code == 200, response.text
        expected = tokenizer.encode(text)
        assert expected == [1, 5, 6, 200, 383, 5]
        assert response.json() == {"count": 6, "max_model_len": MAX_LEN, "tokens": expected}

    body = {"prompt": text, "add_special_tokens": False, "return_token_strs": True}
    response = client.post("/tokenize", json=body, headers=alice.headers)
    assert response.json() == {
        "count": 5,
        "max_model_len": MAX_LEN,
        "tokens": [5, 6, 200, 383, 5],
        "token_strs": ["w5", "w6", "w200", "w383", "w5"],
    }

    for tokens, prompt in (([5, 6, 200, 383, 5], text), ([1, 9], "w1 w9"), ([], "")):
        response = client.post("/detokenize", json={"tokens": tokens}, headers=alice.headers)
        assert response.status_code == 200, response.text
        assert response.json() == {"prompt": prompt}
        assert tokenizer.decode(tokens) == prompt


def test_tokenize_a_conversation_through_the_chat_template(
    worded: tuple[TestClient, Any], alice: TenantAuth
) -> None:
    client, tokenizer = worded
    response = client.post("/tokenize", json={"messages": MESSAGES}, headers=alice.headers)
    assert response.status_code == 200, response.text
    # what /v1/chat/completions feeds the engine (generation.chat_prompt)
    expected = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)["input_ids"]
    # user turns start with w1, assistant turns with w2, every turn ends with w3
    assert expected == [1, 5, 6, 3, 2, 7, 3, 1, 8, 9, 10, 3, 2]
    assert response.json() == {"count": 13, "max_model_len": MAX_LEN, "tokens": expected}

    body = {"messages": MESSAGES, "add_generation_prompt": False, "add_special_tokens": True}
    tokens = client.post("/tokenize", json=body, headers=alice.headers).json()["tokens"]
    assert tokens == [1, *expected[:-1]]  # the BOS; no assistant turn opened


def test_tokenizer_info_is_what_lm_eval_reads(
    worded: tuple[TestClient, Any], alice: TenantAuth
) -> None:
    client, tokenizer = worded
    response = client.get("/tokenizer_info", headers=alice.headers)
    assert response.status_code == 200, response.text
    assert response.json() == {
        "tokenizer_class": type(tokenizer).__name__,
        "bos_token": "w1",
        "eos_token": "w2",
        "pad_token": "w3",
        "unk_token": "w0",
        "model_max_length": MAX_LEN,
        "chat_template": CHAT_TEMPLATE,
        "vocab_size": VOCAB,
    }


def test_lm_evals_remote_tokenizer_works_against_the_routes(
    worded: tuple[TestClient, Any], alice: TenantAuth, monkeypatch: pytest.MonkeyPatch
) -> None:
    """lm-evaluation-harness's own client (tokenizer_backend=remote), its requests answered by
    this app."""
    from lm_eval import utils

    client, tokenizer = worded

    def request(session: Any, method: str, url: str, **kwargs: Any) -> Any:
        kwargs.pop("timeout", None)
        kwargs.pop("verify", None)
        response = client.request(method, url, headers=dict(session.headers), **kwargs)
        if response.status_code >= 400:  # as requests raises it
            raise utils.requests.HTTPError(f"{response.status_code}: {response.text}")
        return response

    monkeypatch.setattr(utils.requests.Session, "request", request)
    base = "http://testserver/v1/completions"
    assert utils.check_remote_tokenizer_support(base, auth_token=alice.api_key)
    assert not utils.check_remote_tokenizer_support(base, auth_token="psk_wrong", max_retries=1)
    remote = utils.RemoteTokenizer(base, auth_token=alice.api_key)
    assert remote.encode("w5 w6") == [5, 6]  # lm_eval asks without special tokens
    assert remote.batch_decode([[5, 6], [1]]) == ["w5 w6", "w1"]
    assert (remote.eos_token, remote.eos_token_id, remote.bos_token_id) == ("w2", 2, 1)
    rendered = remote.apply_chat_template(MESSAGES, add_generation_prompt=True)
    expected = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered == expected == "w1 w5 w6 w3 w2 w7 w3 w1 w8 w9 w10 w3 w2 "


def test_without_a_chat_template_messages_are_400(
    make_client: MakeClient, loaded: LoadedModel
) -> None:
    tokenizer = word_tokenizer()
    with make_client(model=wrap_model(loaded.model, tokenizer, "tiny-words")) as client:
        alice = create_tenant(client, "alice")
        response = client.post("/tokenize", json={"messages": MESSAGES}, headers=alice.headers)
        error = assert_error(response, 400, "messages", "chat template")
        assert error["field"] == "messages"
        info = client.get("/tokenizer_info", headers=alice.headers).json()
        assert info["chat_template"] is None and info["eos_token"] is None


def test_a_model_without_a_tokenizer_is_400(client: TestClient, tenant: TenantAuth) -> None:
    for method, path, body, field in (
        ("POST", "/tokenize", {"prompt": "w5"}, "prompt"),
        ("POST", "/tokenize", {"messages": MESSAGES}, "messages"),
        ("POST", "/detokenize", {"tokens": [5]}, "tokens"),
        ("GET", "/tokenizer_info", None, "tokenizer"),
    ):
        response = client.request(method, path, json=body, headers=tenant.headers)
        error = assert_error(response, 400, field, "no tokenizer")
        assert error["field"] == field


def test_an_id_outside_the_vocabulary_is_400(
    worded: tuple[TestClient, Any], alice: TenantAuth
) -> None:
    client, _ = worded
    response = client.post("/detokenize", json={"tokens": [5, VOCAB, 6]}, headers=alice.headers)
    error = assert_error(response, 400, "tokens", f"[0, {VOCAB})", f"found {VOCAB}")
    assert error["field"] == "tokens"
    response = client.post("/detokenize", json={"tokens": [5, -1]}, headers=alice.headers)
    assert_error(response, 422, "tokens")


def test_every_route_needs_a_key(worded: tuple[TestClient, Any]) -> None:
    client, _ = worded
    for headers in ({}, {"Authorization": "Bearer psk_not-a-key"}):
        for method, path, body in (
            ("POST", "/tokenize", {"prompt": "w5"}),
            ("POST", "/detokenize", {"tokens": [5]}),
            ("GET", "/tokenizer_info", None),
        ):
            response = client.request(method, path, json=body, headers=headers)
            assert_error(response, 401)
            assert response.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize(
    ("path", "body", "words"),
    [
        ("/tokenize", {"prompt": "w5", "temperature": 0}, ("temperature", "extra")),
        ("/tokenize", {"prompt": "w5", "messages": MESSAGES}, ("exactly one",)),
        ("/tokenize", {}, ("exactly one",)),
        ("/tokenize", {"prompt": "w5", "add_generation_prompt": True}, ("only with messages",)),
        ("/tokenize", {"messages": []}, ("messages",)),
        ("/tokenize", {"prompt": 5}, ("prompt",)),
        ("/detokenize", {"tokens": [5], "prompt": "w5"}, ("prompt", "extra")),
        ("/tokenize", {"prompt": "w5", "add_special_tokens": "true"}, ("add_special_tokens",)),
        ("/tokenize", {"prompt": "w5", "return_token_strs": 1}, ("return_token_strs",)),
        ("/detokenize", {"tokens": "w5"}, ("tokens",)),
        ("/detokenize", {"tokens": ["5"]}, ("tokens.0",)),
        ("/detokenize", {"tokens": [5.5]}, ("tokens.0",)),
        ("/detokenize", {"tokens": [True]}, ("tokens.0",)),
        ("/detokenize", {}, ("tokens",)),
    ],
)
def test_invalid_bodies_are_422(
    worded: tuple[TestClient, Any],
    alice: TenantAuth,
    path: str,
    body: dict[str, Any],
    words: tuple[str, ...],
) -> None:
    client, _ = worded
    assert_error(client.post(path, json=body, headers=alice.headers), 422, *words)


def test_a_prompt_is_at_most_a_million_characters(
    make_client: MakeClient, loaded: LoadedModel
) -> None:
    model = wrap_model(loaded.model, word_tokenizer(), "tiny-words")
    with make_client(model=model, max_request_bytes=4 << 20) as client:
        alice = create_tenant(client, "alice")
        limit = MAX_TOKENIZE_CHARS // 4  # words of 4 characters with their space: the limit
        prompt = "w50 " * (limit - 1) + "w383"
        assert len(prompt) == MAX_TOKENIZE_CHARS
        answer = client.post("/tokenize", json={"prompt": prompt}, headers=alice.headers)
        assert answer.status_code == 200, answer.text
        assert answer.json()["count"] == limit
        response = client.post("/tokenize", json={"prompt": prompt + " "}, headers=alice.headers)
        assert_error(response, 422, "prompt", str(MAX_TOKENIZE_CHARS))


def test_unknown_query_parameters_are_400(
    worded: tuple[TestClient, Any], alice: TenantAuth
) -> None:
    client, _ = worded
    response = client.get("/tokenizer_info?verbose=1", headers=alice.headers)
    assert_error(response, 400, "verbose")


def test_max_model_len_is_the_engines(make_client: MakeClient, loaded: LoadedModel) -> None:
    """--max-len, or the model's positions when it has fewer (512 for the tiny llama)."""
    model = wrap_model(loaded.model, word_tokenizer(), "tiny-words")
    for max_len, expected in ((64, 64), (4096, 512)):
        with make_client(model=model, max_len=max_len) as client:
            alice = create_tenant(client, "alice")
            answer = client.post("/tokenize", json={"prompt": "w5"}, headers=alice.headers)
            assert answer.json()["max_model_len"] == expected
            info = client.get("/tokenizer_info", headers=alice.headers).json()
            assert info["model_max_length"] == expected
