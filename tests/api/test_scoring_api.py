"""Scoring over HTTP: log-probs (completions' legacy shape, chat's content list, the native
API), echo, `max_tokens: 0`, `n`, include_usage; exact against the PEFT model, beside another
tenant's request, whose own answer stays exact."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from peft import PeftModel

from server.models import LoadedModel, wrap_model
from tests.api.conftest import (
    MakeClient,
    alone,
    assert_error,
    create_tenant,
    in_background,
    peft_files,
    upload,
)
from tests.tiny import log_probs_of, word_tokenizer

TOLERANCE = 1e-4
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


@pytest.fixture
def worded(
    make_client: MakeClient, loaded: LoadedModel
) -> Iterator[tuple[TestClient, LoadedModel]]:
    """The tiny model with a word tokenizer (token i is the word `w{i}`) and a chat template."""
    tokenizer = word_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    model = wrap_model(loaded.model, tokenizer, "tiny-words")
    with make_client(model=model) as client:
        yield client, model


def peft_model(loaded: LoadedModel, adapter_dir: Path) -> torch.nn.Module:
    return PeftModel.from_pretrained(copy.deepcopy(loaded.model), adapter_dir).eval()


def words(ids: list[int]) -> str:
    return " ".join(f"w{i}" for i in ids)


PROMPT = [5, 17, 42, 8, 99, 3, 250, 11, 64, 7, 120]


@pytest.mark.parametrize("kind", ["prefix", "prompt", "p_tuning"])
def test_echo_with_logprobs_as_lm_eval_sends_it_equals_the_peft_model(
    worded: tuple[TestClient, LoadedModel], adapters: dict[str, Path], kind: str
) -> None:
    client, model = worded
    alice, bob = create_tenant(client, "alice"), create_tenant(client, "bob")
    assert upload(client, alice, peft_files(adapters[kind]), name="task").status_code == 201
    assert upload(client, bob, peft_files(adapters["prefix"]), name="mine").status_code == 201
    victim_prompt = [9, 8, 7, 6]
    victim = {"prompt": victim_prompt, "prefix": "mine", "max_new_tokens": 12, "temperature": 0}
    body = {
        "model": "alice/task",
        "prompt": [PROMPT],
        "echo": True,
        "logprobs": 1,
        "max_tokens": 1,
        "temperature": 0,
        "seed": 1234,
    }
    with in_background(client, "/v1/generate", victim, bob.headers) as other:
        response = client.post("/v1/completions", json=body, headers=alice.headers)
    assert response.status_code == 200, response.text
    (choice,) = response.json()["choices"]
    logprobs = choice["logprobs"]
    generated = logprobs["tokens"][-1]
    tokens = [*PROMPT, int(generated[1:])]
    expected = log_probs_of(peft_model(model, adapters[kind]), tokens)

    assert logprobs["tokens"] == [f"w{t}" for t in tokens]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    for i in range(1, len(tokens)):
        found = logprobs["token_logprobs"][i]
        assert abs(found - expected[i - 1, tokens[i]].item()) < TOLERANCE, i
        ((top_token, top_logprob),) = logprobs["top_logprobs"][i].items()
        assert top_token == f"w{expected[i - 1].argmax().item()}"
        assert abs(top_logprob - expected[i - 1].max().item()) < TOLERANCE
    assert tokens[-1] == expected[-2].argmax().item()  # greedy: lm-eval's check holds
    assert logprobs["token_logprobs"][-1] == max(logprobs["top_logprobs"][-1].values())
    # echo: the prompt's text first (as sent: here its ids' text), then the completion's
    assert choice["text"] == words(PROMPT) + f"w{tokens[-1]}"
    # each token's offset: the length of the tokens before it, each decoded alone
    lengths = [len(t) for t in logprobs["tokens"]]
    assert logprobs["text_offset"] == [sum(lengths[:i]) for i in range(len(lengths))]
    # The other tenant's request, beside it, is exactly what it gives alone.
    files = peft_files(adapters["prefix"])
    assert other["response"].json()["token_ids"] == alone(model, victim_prompt, files, 12)


def test_max_tokens_0_with_echo_scores_without_generating(
    worded: tuple[TestClient, LoadedModel], adapters: dict[str, Path]
) -> None:
    client, model = worded
    alice = create_tenant(client, "alice")
    body = {
        "model": "tiny-words",
        "prompt": words(PROMPT),
        "echo": True,
        "logprobs": 0,
        "max_tokens": 0,
    }
    response = client.post("/v1/completions", json=body, headers=alice.headers)
    assert response.status_code == 200, response.text
    (choice,) = response.json()["choices"]
    assert choice["text"] == words(PROMPT) and choice["finish_reason"] == "length"
    assert response.json()["usage"]["completion_tokens"] == 0
    expected = log_probs_of(model.model, PROMPT)
    found = choice["logprobs"]["token_logprobs"]
    assert len(found) == len(PROMPT)
    for i in range(1, len(PROMPT)):
        assert abs(found[i] - expected[i - 1, PROMPT[i]].item()) < TOLERANCE
    assert choice["logprobs"]["top_logprobs"][1:] == [{}] * (len(PROMPT) - 1)
    # echo alone, no logprobs: the prompt back, nothing else
    del body["logprobs"]
    (choice,) = client.post("/v1/completions", json=body, headers=alice.headers).json()["choices"]
    assert choice["text"] == words(PROMPT) and choice["logprobs"] is None


def test_chat_logprobs_in_the_chat_shape_equal_the_model(
    worded: tuple[TestClient, LoadedModel],
) -> None:
    client, model = worded
    alice = create_tenant(client, "alice")
    body = {
        "model": "tiny-words",
        "messages": [{"role": "user", "content": words(PROMPT)}],
        "logprobs": True,
        "top_logprobs": 3,
        "max_tokens": 4,
        "temperature": 0,
    }
    response = client.post("/v1/chat/completions", json=body, headers=alice.headers)
    assert response.status_code == 200, response.text
    (choice,) = response.json()["choices"]
    content = choice["logprobs"]["content"]
    prompt = model.tokenizer.apply_chat_template(  # type: ignore[union-attr]
        [{"role": "user", "content": words(PROMPT)}], add_generation_prompt=True, tokenize=True
    )
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    generated = [int(entry["token"][1:]) for entry in content]
    expected = log_probs_of(model.model, prompt + generated)
    for k, entry in enumerate(content):
        row = expected[len(prompt) - 1 + k]
        assert abs(entry["logprob"] - row[generated[k]].item()) < TOLERANCE
        assert entry["bytes"] == list(entry["token"].encode())
        assert [t["token"] for t in entry["top_logprobs"]] == [
            f"w{i}" for i in row.topk(3).indices.tolist()
        ]
    assert_error(
        client.post(
            "/v1/chat/completions", json={**body, "logprobs": False}, headers=alice.headers
        ),
        400,
        "top_logprobs",
        "logprobs",
    )
    assert_error(
        client.post(
            "/v1/chat/completions", json={**body, "top_logprobs": 21}, headers=alice.headers
        ),
        422,
        "top_logprobs",
    )


def engine_metrics(client: TestClient) -> Any:
    return client.app.state.services.engine.core.metrics  # type: ignore[attr-defined]


def test_n_choices_prefill_once_greedy_identical_seeded_reproducible(
    worded: tuple[TestClient, LoadedModel], adapters: dict[str, Path]
) -> None:
    client, _ = worded
    alice = create_tenant(client, "alice")
    assert upload(client, alice, peft_files(adapters["prefix"]), name="task").status_code == 201
    body = {
        "model": "task",
        "prompt": [PROMPT],
        "n": 3,
        "max_tokens": 6,
        "temperature": 0,
        "logprobs": 2,
    }
    before = engine_metrics(client).prefill_tokens
    response = client.post("/v1/completions", json=body, headers=alice.headers).json()
    assert engine_metrics(client).prefill_tokens - before == len(PROMPT)  # once for 3
    choices = response["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    assert len({c["text"] for c in choices}) == 1
    assert len({json.dumps(c["logprobs"]["tokens"]) for c in choices}) == 1
    for choice in choices[1:]:  # the same distribution, up to the batch's rounding
        pairs = zip(
            choice["logprobs"]["token_logprobs"],
            choices[0]["logprobs"]["token_logprobs"],
            strict=True,
        )
        assert all(abs(a - b) < TOLERANCE for a, b in pairs)
    assert response["usage"]["prompt_tokens"] == len(PROMPT)  # a prompt counts once
    assert response["usage"]["completion_tokens"] == 18

    seeded = {**body, "temperature": 1.0, "seed": 7, "max_tokens": 10}
    first = client.post("/v1/completions", json=seeded, headers=alice.headers).json()
    again = client.post("/v1/completions", json=seeded, headers=alice.headers).json()
    assert [c["text"] for c in first["choices"]] == [c["text"] for c in again["choices"]]
    assert len({c["text"] for c in first["choices"]}) > 1
    # Two prompts, n = 2: prompt i's choices are 2i and 2i + 1.
    two = {**body, "prompt": [PROMPT, PROMPT[:4]], "n": 2, "max_tokens": 3}
    choices = client.post("/v1/completions", json=two, headers=alice.headers).json()["choices"]
    assert choices[0]["text"] == choices[1]["text"] and choices[2]["text"] == choices[3]["text"]


def sse(response: Any) -> list[Any]:
    events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_streams_carry_each_chunks_logprobs_the_echo_and_the_usage_last(
    worded: tuple[TestClient, LoadedModel],
) -> None:
    client, _ = worded
    alice = create_tenant(client, "alice")
    body = {
        "model": "tiny-words",
        "prompt": PROMPT,
        "echo": True,
        "logprobs": 2,
        "max_tokens": 5,
        "temperature": 0,
    }
    whole = client.post("/v1/completions", json=body, headers=alice.headers).json()
    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=streamed, headers=alice.headers) as r:
        events = sse(r)
    *chunks, last = events
    assert last["choices"] == [] and last["usage"] == whole["usage"]
    assert all(e["usage"] is None for e in chunks)
    text = "".join(e["choices"][0]["text"] for e in chunks)
    joined: dict[str, list[Any]] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    for event in chunks:
        for key in joined:
            joined[key] += event["choices"][0]["logprobs"][key]
    assert text == whole["choices"][0]["text"]
    assert joined == whole["choices"][0]["logprobs"]

    # n = 2 in one stream: every event names its choice; each finishes once.
    both = {**streamed, "n": 2, "echo": False}
    with client.stream("POST", "/v1/completions", json=both, headers=alice.headers) as r:
        events = sse(r)
    finished = [c["index"] for e in events for c in e["choices"] if c["finish_reason"]]
    assert sorted(finished) == [0, 1]
    assert events[-1]["usage"]["completion_tokens"] == 10


def test_native_logprobs_match_the_openai_ones(
    worded: tuple[TestClient, LoadedModel],
) -> None:
    client, _ = worded
    alice = create_tenant(client, "alice")
    native = {
        "prompt": PROMPT,
        "max_new_tokens": 3,
        "temperature": 0,
        "logprobs": 2,
        "prompt_logprobs": 2,
    }
    result = client.post("/v1/generate", json=native, headers=alice.headers).json()
    openai = {
        "model": "tiny-words",
        "prompt": PROMPT,
        "max_tokens": 3,
        "temperature": 0,
        "logprobs": 2,
        "echo": True,
    }
    legacy = client.post("/v1/completions", json=openai, headers=alice.headers).json()
    legacy = legacy["choices"][0]["logprobs"]
    entries = result["prompt_logprobs"] + result["logprobs"]
    assert entries[0] is None
    assert [e["logprob"] for e in entries[1:]] == legacy["token_logprobs"][1:]
    assert [e["token_id"] for e in result["logprobs"]] == result["token_ids"]
    tops = [{f"w{t['token_id']}": t["logprob"] for t in e["top_logprobs"]} for e in entries[1:]]
    assert tops == legacy["top_logprobs"][1:]
    scored = client.post(
        "/v1/generate", json={**native, "max_new_tokens": 0}, headers=alice.headers
    ).json()
    assert scored["token_ids"] == [] and scored["prompt_logprobs"] == result["prompt_logprobs"]


def test_penalties_and_bias_over_http_change_the_tokens_as_the_engine_does(
    worded: tuple[TestClient, LoadedModel],
) -> None:
    client, model = worded
    alice = create_tenant(client, "alice")
    plain = {"prompt": PROMPT, "max_new_tokens": 8, "temperature": 0}
    first = client.post("/v1/generate", json=plain, headers=alice.headers).json()["token_ids"]
    banned = {
        **plain,
        "logit_bias": {str(first[0]): -100},
        "repetition_penalty": 1.5,
        "frequency_penalty": 0.5,
        "presence_penalty": 0.5,
        "min_tokens": 2,
    }
    tokens = client.post("/v1/generate", json=banned, headers=alice.headers).json()["token_ids"]
    expected = alone(
        model,
        PROMPT,
        None,
        8,
        logit_bias=((first[0], -100.0),),
        repetition_penalty=1.5,
        frequency_penalty=0.5,
        presence_penalty=0.5,
        min_tokens=2,
    )
    assert tokens == expected and tokens[0] != first[0]


def test_n_with_an_ensemble_is_refused(
    worded: tuple[TestClient, LoadedModel], adapters: dict[str, Path]
) -> None:
    client, _ = worded
    alice = create_tenant(client, "alice")
    for name in ("a", "b"):
        assert upload(client, alice, peft_files(adapters["prefix"]), name=name).status_code == 201
    stored = {"name": "both", "prefixes": ["a", "b"], "method": "vote"}
    assert client.post("/v1/ensembles", json=stored, headers=alice.headers).status_code == 201
    body = {"model": "both", "prompt": PROMPT, "n": 2, "max_tokens": 2}
    assert_error(client.post("/v1/completions", json=body, headers=alice.headers), 400, "n:")


BAD_SCORING: list[tuple[str, dict[str, Any], int, str]] = [
    ("/v1/completions", {"logprobs": 21}, 422, "logprobs"),
    ("/v1/completions", {"max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"n": 99}, 400, "n"),
    ("/v1/completions", {"n": 2, "model": "both"}, 400, "n"),  # a vote ensemble
    ("/v1/completions", {"logit_bias": {"999": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"logit_bias": {"1": 200}}, 422, "logit_bias"),
    ("/v1/completions", {"logit_bias": {str(i): 1 for i in range(301)}}, 422, "logit_bias"),
    ("/v1/completions", {"presence_penalty": 9}, 422, "presence_penalty"),
    ("/v1/completions", {"frequency_penalty": -9}, 422, "frequency_penalty"),
    ("/v1/completions", {"repetition_penalty": -1}, 422, "repetition_penalty"),
    ("/v1/chat/completions", {"top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 50}, 422, "top_logprobs"),
    ("/v1/generate", {"prompt_logprobs": 99}, 422, "prompt_logprobs"),
    ("/v1/generate", {"max_new_tokens": 0}, 400, "max_new_tokens"),
]


def test_bad_scoring_input_is_a_4xx_naming_the_field_and_another_tenant_stays_exact(
    worded: tuple[TestClient, LoadedModel], adapters: dict[str, Path]
) -> None:
    client, model = worded
    alice, bob = create_tenant(client, "alice"), create_tenant(client, "bob")
    for name in ("a", "b"):
        assert upload(client, alice, peft_files(adapters["prefix"]), name=name).status_code == 201
    stored = {"name": "both", "prefixes": ["a", "b"], "method": "vote"}
    assert client.post("/v1/ensembles", json=stored, headers=alice.headers).status_code == 201
    victim_prompt = [4, 5, 6]
    expected = alone(model, victim_prompt, None, 10)
    victim = {"prompt": victim_prompt, "max_new_tokens": 10, "temperature": 0, "logprobs": 1}
    bases = {
        "/v1/completions": {"model": "tiny-words", "prompt": PROMPT, "max_tokens": 2},
        "/v1/chat/completions": {"model": "tiny-words", "max_tokens": 2,
                                 "messages": [{"role": "user", "content": "w1 w2"}]},
        "/v1/generate": {"prompt": PROMPT},
    }  # fmt: skip
    for route, change, status, field in BAD_SCORING:
        with in_background(client, "/v1/generate", victim, bob.headers) as other:
            response = client.post(route, json={**bases[route], **change}, headers=alice.headers)
        error = assert_error(response, status, field)
        if status == 400:
            assert error["field"] == field
        assert other["response"].json()["token_ids"] == expected, (route, change)


def test_a_vote_answers_its_winners_log_probs_and_ensembles_refuse_prompt_scoring(
    worded: tuple[TestClient, LoadedModel], adapters: dict[str, Path]
) -> None:
    client, _ = worded
    alice = create_tenant(client, "alice")
    for name, kind in (("a", "prefix"), ("b", "prompt")):
        assert upload(client, alice, peft_files(adapters[kind]), name=name).status_code == 201
    vote = {"prompt": PROMPT, "prefixes": ["a", "b"], "ensemble": "vote", "max_new_tokens": 4,
            "temperature": 0, "logprobs": 2}  # fmt: skip
    response = client.post("/v1/generate", json=vote, headers=alice.headers)
    assert response.status_code == 200, response.text
    body = response.json()
    assert [e["token_id"] for e in body["logprobs"]] == body["token_ids"]
    winner = next(c for c in body["ensemble"]["candidates"] if c["text"] == body["text"])
    single = {"prompt": PROMPT, "prefix": winner["prefix"], "max_new_tokens": 4,
              "temperature": 0, "logprobs": 2}  # fmt: skip
    alone = client.post("/v1/generate", json=single, headers=alice.headers).json()
    for mine, its in zip(body["logprobs"], alone["logprobs"], strict=True):
        assert abs(mine["logprob"] - its["logprob"]) < TOLERANCE
    for method in ("vote", "mean"):
        scoring = {**vote, "ensemble": method, "prompt_logprobs": 1}
        assert_error(
            client.post("/v1/generate", json=scoring, headers=alice.headers),
            400,
            "prompt_logprobs",
            "ensemble",
        )


def test_logit_bias_keys_are_plain_token_ids_each_once(
    worded: tuple[TestClient, LoadedModel],
) -> None:
    client, _ = worded
    alice = create_tenant(client, "alice")
    body = {"prompt": PROMPT, "max_new_tokens": 2}
    for keys in ({"²": 1}, {"٣": 1}, {"1" * 4301: 1}, {"1234567890": 1}, {"5": 1, "05": 2},
                 {"-1": 1}, {"": 1}):  # fmt: skip
        response = client.post(
            "/v1/generate", json={**body, "logit_bias": keys}, headers=alice.headers
        )
        assert_error(response, 422, "logit_bias")
    ok = client.post("/v1/generate", json={**body, "logit_bias": {"007": 3}}, headers=alice.headers)
    assert ok.status_code == 200, ok.text


def test_n_times_prompts_beyond_the_tenants_queue_is_a_400_naming_n(
    make_client: MakeClient, loaded: LoadedModel
) -> None:
    model = wrap_model(loaded.model, word_tokenizer(), "tiny-words")
    with make_client(model=model, max_waiting_per_tenant=5) as client:
        alice = create_tenant(client, "alice")
        body = {"model": "tiny-words", "prompt": [PROMPT, PROMPT[:3], PROMPT[:5]], "n": 2,
                "max_tokens": 2}  # fmt: skip
        assert_error(
            client.post("/v1/completions", json=body, headers=alice.headers), 400, "n:", "5"
        )
        fits = {**body, "prompt": [PROMPT, PROMPT[:3]]}
        response = client.post("/v1/completions", json=fits, headers=alice.headers)
        assert response.status_code == 200 and len(response.json()["choices"]) == 4


def test_min_tokens_above_the_tokens_asked_for_is_a_400(
    worded: tuple[TestClient, LoadedModel],
) -> None:
    client, _ = worded
    alice = create_tenant(client, "alice")
    body = {"prompt": PROMPT, "max_new_tokens": 3, "min_tokens": 4}
    assert_error(client.post("/v1/generate", json=body, headers=alice.headers), 400, "min_tokens")


def test_a_prompt_not_all_scored_reports_null_for_the_rest() -> None:
    from server.api.logprob_shapes import native, scored_prompt

    entries = native(scored_prompt([4, 5, 6, 7], [(-1.0, [])]))
    assert entries[0] is None and entries[1] == {"token_id": 5, "logprob": -1.0,
                                                 "top_logprobs": []}  # fmt: skip
    assert entries[2:] == [None, None]
