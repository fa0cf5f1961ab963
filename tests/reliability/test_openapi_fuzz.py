"""schemathesis against the live server's own OpenAPI document: every route, authenticated,
a bounded number of derandomized examples per operation (schemathesis's examples, coverage and
fuzzing phases, valid and invalid data alike). No request may get a 5xx, and every response
must agree with the document where the document says something.

The operations are collected from the document the app factory builds (collection happens
before any server runs); the first test checks that the live server serves exactly that one.

Two passes over the same document:
- as served: what a client reading /openapi.json may send, mostly refused by the server's
  own limits (a 4xx, never a 5xx);
- steered: the same bodies with the token counts, prefix references, model ids and token ids
  moved into what the server accepts, so most requests really run on the engine, with every
  sampling field, stop strings and streams drawn by hypothesis.

Every default check of schemathesis runs (no 5xx; statuses, media types, headers and bodies as
declared; schema-valid requests accepted, invalid ones refused; unsupported methods answered
405 with `Allow`). The document states the server's limits, its model's vocabulary and id, and
the naming rules; the refusals no schema can state (a prefix's length, a file's contents, how a
text tokenizes) are listed on each operation (server/api/openapi_rules.py), and a 400 or 422
naming only such a field is the one schema-valid refusal the acceptance check lets through.
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks
from transformers import AutoTokenizer

from server.api.app import create_app
from server.api.openapi_bounds import ServedModel, state_server_bounds
from server.api.openapi_rules import RULES
from server.config import Settings
from tests.api.tuning import CHAT_TEMPLATE
from tests.reliability.common import ADMIN, Live, bearer, build_world, live_server
from tests.tiny import tiny_config

EXAMPLES = 60  # per operation and pass, besides schemathesis's coverage-phase cases
MAX_NEW_TOKENS = 32  # the server's limit in this module
VOCAB = tiny_config("llama").vocab_size
MODEL_ID = "model"  # the served folder's name (build_world writes it as root/model)

SETTINGS = {"max_new_tokens_limit": MAX_NEW_TOKENS}  # the live server's, besides the e2e helper's
# The document states the server's limits and its model: built with the live server's settings
# (the e2e helper starts it with 4 slots and 128 positions) and the tiny model's id and vocabulary.
SERVED = Settings.model_validate({**SETTINGS, "num_slots": 4, "max_len": 128, "data_dir": "unused"})
DOCUMENT: dict[str, Any] = state_server_bounds(
    copy.deepcopy(create_app(SERVED).openapi()), SERVED, ServedModel(MODEL_ID, VOCAB)
)


def explorer() -> schemathesis.BaseSchema:
    schema = schemathesis.openapi.from_dict(DOCUMENT)
    # The key is sent by call_and_check; missing and bad keys have tests of their own.
    schema.config.generation.update(
        max_examples=EXAMPLES, deterministic=True, with_security_parameters=False
    )
    # read every event of a stream: one per token at most, then [DONE]
    schema.config.max_stream_events = 2 * MAX_NEW_TOKENS + 2
    return schema


as_served = explorer()
steered = explorer()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("fuzz")
    world = build_world(root)
    assert world.loaded.model_id == MODEL_ID
    give_a_chat_template(world.model_dir)
    with live_server(world, root / "server.log", **SETTINGS) as live:
        TRAINING_FILES.append(upload_training_file(live))
        yield live


def give_a_chat_template(model_dir: Path) -> None:
    """So that chat completions run (the word tokenizer has no template of its own)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(model_dir)


# alice's training file: steered fine-tuning jobs train on it, so they really run
TRAINING_FILES: list[str] = []


def upload_training_file(live: Live) -> str:
    records = [{"prompt": f"w{i} w{i + 1}", "completion": " w40 w41"} for i in range(1, 4)]
    response = httpx.post(
        f"{live.url}/v1/files",
        files={"file": ("t.jsonl", "\n".join(json.dumps(r) for r in records).encode())},
        data={"purpose": "fine-tune"},
        headers=bearer(live.keys["alice"]),
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def headers_for(case: schemathesis.Case, live: Live) -> dict[str, str]:
    return bearer(ADMIN if case.path == "/v1/tenants" else live.keys["alice"])


def call_and_check(case: schemathesis.Case, live: Live) -> None:
    headers = headers_for(case, live)
    response = case.call(base_url=live.url, headers=headers, timeout=120)
    excluded = []
    if response.status_code == 413:
        # Over the body limit (violating a list's maxItems can take megabytes): refused before
        # it is parsed, which rejects invalid data as surely as a 422; the check lists no 413.
        excluded.append(checks.negative_data_rejection)
    if refused_by_a_stated_rule(case, response):
        excluded.append(checks.positive_data_acceptance)
    case.validate_response(response, headers=headers, excluded_checks=excluded)
    if response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
        assert not response.stream_cut_short, "schemathesis stopped reading: raise its limit"
        assert_well_formed_stream(response.text)


def refused_by_a_stated_rule(case: schemathesis.Case, response: Any) -> bool:
    """A 400 or 422 naming only fields whose rules the operation's description lists
    (server/api/openapi_rules.py)."""
    if response.status_code not in (400, 422):
        return False
    rules = RULES.get((case.method.lower(), case.path), {})
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    fields = [detail.get("field") for detail in error.get("details", [])] or [error.get("field")]
    return all(field in rules for field in fields)


def assert_well_formed_stream(text: str) -> None:
    """Server-sent events: `data: {json}` events, the last one `data: [DONE]`."""
    events = [line.removeprefix("data: ") for line in text.splitlines() if line]
    assert events and events[-1] == "[DONE]", text[-500:]
    for event in events[:-1]:
        assert isinstance(json.loads(event), dict), event


def test_the_live_server_serves_the_document_the_battery_explores(live: Live) -> None:
    served = httpx.get(f"{live.url}/openapi.json", timeout=30)
    assert served.status_code == 200
    assert served.json() == DOCUMENT


@as_served.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_the_document_as_served(case: schemathesis.Case, live: Live) -> None:
    call_and_check(case, live)


# Steering: where a drawn value is of the right type, move it into what this server accepts.
PREFIX_REFS = [None, "alice/pirate", "pirate", "bob/poet"]  # bob's is private: 404 for alice
MODELS = [MODEL_ID, "alice/pirate", "pirate", "bob/poet"]
PATHS = [
    {"owner": "alice", "name": "pirate"},
    {"owner": "bob", "name": "poet"},
    {"owner": "alice", "name": "absent"},
]
UNSUPPORTED = ("n", "best_of", "echo", "logprobs", "presence_penalty", "frequency_penalty")


def whole(value: Any) -> bool:
    """An integer as JSON has it: 3 or 3.0, not a boolean."""
    return isinstance(value, int | float) and not isinstance(value, bool) and value % 1 == 0


def steer_tokens(value: Any) -> Any:
    """Token ids into the vocabulary; at most 64 tokens a prompt and 4 prompts a call."""
    if isinstance(value, list) and value and all(whole(t) for t in value):
        return [int(abs(t)) % VOCAB for t in value[:64]]
    if isinstance(value, list):
        return [steer_tokens(v) or "w1" for v in value[:4]]
    if isinstance(value, str):
        return value[:200]
    return value


def steer_body(method: str, path: str, body: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    known = operation_fields(method, path)
    body = {k: v for k, v in body.items() if k in known and k not in UNSUPPORTED}
    for field in ("max_new_tokens", "max_tokens", "max_completion_tokens"):
        if whole(body.get(field)):
            body[field] = 1 + int(abs(body[field])) % MAX_NEW_TOKENS
    if whole(body.get("top_k")):
        body["top_k"] = int(abs(body["top_k"])) % (VOCAB + 1)
    if "prompt" in body:
        body["prompt"] = steer_tokens(body["prompt"]) or "w1 w2 w3"
    if "prefix" in body or path == "/v1/generate":
        body["prefix"] = rng.choice(PREFIX_REFS)
    if "model" in body:
        body["model"] = rng.choice(MODELS)
    if isinstance(body.get("candidates"), list):
        body["candidates"] = rng.choice([["alice/pirate"], ["pirate", "bob/poet"], None])
    for field in ("training_file", "validation_file"):
        if isinstance(body.get(field), str) and TRAINING_FILES:
            body[field] = TRAINING_FILES[0]
    return body


def operation_fields(method: str, path: str) -> set[str]:
    content = DOCUMENT["paths"][path][method.lower()].get("requestBody", {}).get("content", {})
    ref = content.get("application/json", {}).get("schema", {}).get("$ref", "")
    component = DOCUMENT["components"]["schemas"].get(ref.rpartition("/")[2], {})
    return set(component.get("properties", {}))


def steer(case: schemathesis.Case) -> None:
    """Move a valid case's values into what this server accepts (invalid cases stay as drawn:
    they must be refused). Deterministic: the choices are seeded by the case itself."""
    if case.meta is None or case.meta.generation.mode.is_negative:
        return
    rng = random.Random(repr((case.method, case.path, case.body, case.path_parameters)))
    if isinstance(case.body, dict):
        case.body = steer_body(case.method, case.path, case.body, rng)
    if case.path_parameters and case.path.startswith("/v1/prefixes/"):
        # alice's own prefix is never deleted: the operations after DELETE still use it
        paths = PATHS[1:] if case.method.upper() == "DELETE" else PATHS
        case.path_parameters = dict(rng.choice(paths))
    if isinstance(case.query, dict) and "scope" in case.query:
        case.query = {**case.query, "scope": rng.choice(["own", "public", "all"])}


@steered.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_steered_into_what_the_server_accepts(case: schemathesis.Case, live: Live) -> None:
    steer(case)
    call_and_check(case, live)


# What docs/api.md says each operation answers (its table of statuses), by (method, path).
GENERATION = {"200", "400", "401", "404", "409", "422", "429", "503"}
DOCUMENTED_STATUSES = {
    ("get", "/health"): {"200", "503"},
    ("post", "/v1/tenants"): {"201", "401", "403", "409", "422", "503"},
    ("post", "/v1/prefixes"): {"201", "401", "409", "413", "415", "422", "503"},
    ("get", "/v1/prefixes"): {"200", "401", "422", "503"},
    ("get", "/v1/prefixes/{owner}/{name}"): {"200", "401", "404", "422", "503"},
    ("delete", "/v1/prefixes/{owner}/{name}"): {"204", "401", "404", "422", "503"},
    ("patch", "/v1/prefixes/{owner}/{name}"): {"200", "401", "404", "422", "503"},
    ("get", "/v1/prefixes/{owner}/{name}/adapter"): {"200", "401", "404", "422", "503"},
    ("post", "/v1/generate"): GENERATION,
    ("post", "/v1/completions"): GENERATION,
    ("post", "/v1/chat/completions"): GENERATION,
    ("get", "/v1/models"): {"200", "401", "503"},
    ("post", "/v1/files"): {"200", "400", "401", "413", "415", "422", "503"},
    ("get", "/v1/files"): {"200", "400", "401", "404", "422", "503"},
    ("get", "/v1/files/{file_id}"): {"200", "401", "404", "503"},
    ("get", "/v1/files/{file_id}/content"): {"200", "401", "404", "503"},
    ("delete", "/v1/files/{file_id}"): {"200", "401", "404", "409", "503"},
    ("post", "/v1/fine_tuning/jobs"): {"200", "400", "401", "404", "409", "422", "503"},
    ("get", "/v1/fine_tuning/jobs"): {"200", "400", "401", "404", "422", "503"},
    ("get", "/v1/fine_tuning/jobs/{job_id}"): {"200", "401", "404", "503"},
    ("get", "/v1/fine_tuning/jobs/{job_id}/events"): {"200", "400", "401", "404", "422", "503"},
    ("get", "/v1/fine_tuning/jobs/{job_id}/checkpoints"): {
        "200",
        "400",
        "401",
        "404",
        "422",
        "503",
    },
    ("post", "/v1/fine_tuning/jobs/{job_id}/cancel"): {"200", "401", "404", "409", "503"},
    ("post", "/v1/fine_tuning/transferability"): GENERATION,  # scores rows on the engine
    ("get", "/v1/usage"): {"200", "400", "401", "403", "422", "429", "503"},
    ("post", "/tokenize"): {"200", "400", "401", "422", "503"},
    ("post", "/detokenize"): {"200", "400", "401", "422", "503"},
    ("get", "/tokenizer_info"): {"200", "400", "401", "503"},
}
STREAMING = [("post", path) for path in ("/v1/generate", "/v1/completions", "/v1/chat/completions")]


def test_the_document_declares_what_the_server_answers() -> None:
    problems = []
    for (method, path), statuses in DOCUMENTED_STATUSES.items():
        responses = DOCUMENT["paths"].get(path, {}).get(method, {}).get("responses", {})
        declared = set(responses)
        missing = {s for s in statuses if s not in declared and f"{s[0]}XX" not in declared}
        if missing and "default" not in declared:
            problems.append(f"{method.upper()} {path}: statuses {sorted(missing)} not declared")
        error = responses.get("422", {}).get("content", {}).get("application/json", {})
        name = error.get("schema", {}).get("$ref", "").rpartition("/")[2]
        properties = DOCUMENT["components"]["schemas"].get(name, {}).get("properties", {})
        if "422" in declared and "error" not in properties:
            problems.append(f"{method.upper()} {path}: 422 declared as {name}, not the error body")
    for method, path in STREAMING:
        content = DOCUMENT["paths"][path][method]["responses"].get("200", {}).get("content", {})
        if "text/event-stream" not in content:
            problems.append(f"{method.upper()} {path}: 200 text/event-stream not declared")
    upload = DOCUMENT["paths"]["/v1/prefixes"]["post"].get("requestBody", {}).get("content", {})
    if "multipart/form-data" not in upload:
        problems.append("POST /v1/prefixes: no multipart/form-data request body")
    if not DOCUMENT.get("components", {}).get("securitySchemes"):
        problems.append("no security scheme: nothing says /v1 takes `Authorization: Bearer`")
    assert problems == []


def test_a_body_that_is_not_utf8_is_refused_as_malformed_json(live: Live) -> None:
    for path, key in [("/v1/generate", live.keys["alice"]), ("/v1/tenants", ADMIN)]:
        response = httpx.post(
            f"{live.url}{path}",
            content=b'{"prompt": "\xff\xfe"}',
            headers={**bearer(key), "Content-Type": "application/json"},
            timeout=30,
        )
        assert (response.status_code, response.json()["error"].get("field")) == (422, "body"), (
            path,
            response.text,
        )


def test_the_rules_no_schema_states_are_listed_on_their_operations() -> None:
    for (method, path), rules in RULES.items():
        description = DOCUMENT["paths"][path][method]["description"]
        for field, rule in rules.items():
            assert f"- `{field}`: {rule}" in description, (method, path, field)
