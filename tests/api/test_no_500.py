"""No input a client can send produces a 500: garbage of every type in every field of every
route, and bodies that are not even JSON. Each answer is < 500 and, if an error, the error
shape."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import (
    ADMIN_KEY,
    NewTenant,
    Response,
    TenantAuth,
    Upload,
    assert_client_error_shape,
    bearer,
    peft_files,
)

BASE = "tiny-llama"


def _deep(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


# fmt: off
GARBAGE: list[Any] = [
    None, True, False, 0, -1, 1.5, -0.0, 10**30, -(10**30), 2**63, 2**64, -(2**63) - 1,
    1e308, -1e308, 5e-324, "", "x", "1", "\x00", "é" * 1000, "../../etc/passwd", [], {},
    [None], [[]], [[1, [2]]], {"a": [1, {"b": None}]}, [-5], [10**30], [2**63], ["x"],
    [1.5], [True], [""], _deep(200), list(range(5000)),
]
# fmt: on

# Each route: a valid body, and the fields to fill with garbage one at a time.
# fmt: off
ROUTES: dict[str, tuple[dict[str, Any], list[str]]] = {
    "/v1/generate": (
        {"prompt": [1], "max_new_tokens": 1},
        ["prompt", "prefix", "max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop",
         "ignore_eos", "stream", "extra"],
    ),
    "/v1/completions": (
        {"model": BASE, "prompt": [1], "max_tokens": 1},
        ["model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n",
         "stream", "logprobs", "echo", "best_of", "presence_penalty", "frequency_penalty",
         "extra"],
    ),
    "/v1/chat/completions": (
        {"model": BASE, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1},
        ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "n",
         "stream", "extra"],
    ),
    "/v1/tenants": ({"name": "g"}, ["name", "extra"]),
    "/v1/fine_tuning/jobs": (
        {"model": BASE, "training_file": "file-x"},
        ["model", "training_file", "validation_file", "hyperparameters", "suffix", "seed",
         "method", "extra"],
    ),
}
# fmt: on
CASES = [(route, field) for route, (_, fields) in ROUTES.items() for field in fields]


@pytest.fixture
def alice(client: TestClient, new_tenant: NewTenant, upload_adapter: Upload) -> TenantAuth:
    alice = new_tenant("alice")
    upload_adapter(alice, "style", "prompt")
    return alice


def headers_for(route: str, alice: TenantAuth) -> dict[str, str]:
    return bearer(ADMIN_KEY) if route == "/v1/tenants" else alice.headers


def send(client: TestClient, route: str, body: Any, headers: dict[str, str]) -> Response:
    return client.post(
        route,
        content=json.dumps(body).encode(),
        headers={**headers, "content-type": "application/json"},
    )


def check_all(responses: Iterator[tuple[Any, Response]]) -> None:
    """Every answer checked; the failures listed together."""
    failures = []
    for what, response in responses:
        try:
            assert_client_error_shape(response)
        except (AssertionError, ValueError, KeyError, TypeError) as exc:
            failures.append(
                f"{what!r:.80} -> {response.status_code} {response.text[:200]} ({exc!r:.80})"
            )
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize(("route", "field"), CASES)
def test_garbage_in_any_field_is_never_a_500(
    client: TestClient, alice: TenantAuth, route: str, field: str
) -> None:
    base, _ = ROUTES[route]
    headers = headers_for(route, alice)
    check_all(
        ((field, value), send(client, route, {**base, field: value}, headers)) for value in GARBAGE
    )


def test_garbage_in_nested_fields_is_never_a_500(client: TestClient, alice: TenantAuth) -> None:
    def bodies() -> Iterator[tuple[Any, Response]]:
        for value in GARBAGE:
            message = {"role": "user", "content": value}
            body: dict[str, Any] = {"model": BASE, "messages": [message, value]}
            yield body, send(client, "/v1/chat/completions", body, alice.headers)
            body = {"model": BASE, "messages": [{"role": value, "content": "x"}]}
            yield body, send(client, "/v1/chat/completions", body, alice.headers)
            body = {"model": BASE, "prompt": [[1], value], "max_tokens": 1}
            yield body, send(client, "/v1/completions", body, alice.headers)
            body = {"prompt": [1, value], "max_new_tokens": 1}
            yield body, send(client, "/v1/generate", body, alice.headers)
            body = {"prompt": [1], "stop": [value], "max_new_tokens": 1}
            yield body, send(client, "/v1/generate", body, alice.headers)
            for field in ("n_epochs", "batch_size", "learning_rate_multiplier"):
                body = {"model": BASE, "training_file": "f", "hyperparameters": {field: value}}
                yield body, send(client, "/v1/fine_tuning/jobs", body, alice.headers)
            for method in ({"type": value}, {"type": "prefix_tuning", "prefix_tuning": value}):
                body = {"model": BASE, "training_file": "f", "method": method}
                yield body, send(client, "/v1/fine_tuning/jobs", body, alice.headers)

    check_all(bodies())


# fmt: off
RAW_BODIES = [
    b"", b"[]", b"null", b"0", b'"prompt"', b"\xff\xfe\x00", b"{oops", b'{"prompt": 1e999}',
    b'{"prompt": [1], "temperature": NaN}', b'{"prompt": [1], "top_p": Infinity}',
    b'{"prompt": [1], "seed": -Infinity}', b"[" * 10000, b'{"a":' * 5000, b"\x00" * 100,
    b'{"prompt": [1], "prompt": "dup"}',
    '{"prompt": "\ud800"}'.encode("utf-8", "surrogatepass"),
]
# fmt: on
CONTENT_TYPES = ["application/json", "text/plain", "application/x-www-form-urlencoded", ""]


@pytest.mark.parametrize("route", [*ROUTES, "/v1/prefixes", "/v1/files"])
def test_bodies_that_are_not_json_objects_are_never_a_500(
    client: TestClient, alice: TenantAuth, route: str
) -> None:
    headers = headers_for(route, alice)

    def responses() -> Iterator[tuple[Any, Response]]:
        for content_type in CONTENT_TYPES:
            for raw in RAW_BODIES:
                sent = {**headers, **({"content-type": content_type} if content_type else {})}
                response = client.post(route, content=raw, headers=sent)
                yield (content_type, raw[:40]), response
                if route not in ("/v1/prefixes", "/v1/files"):
                    assert response.status_code != 200, (content_type, raw[:40])

    check_all(responses())


# Uploads ------------------------------------------------------------------------------------

# fmt: off
FORM_GARBAGE = [
    "", " ", "\x00", "null", "[]", "{}", "-1", "1e308", "true", "TRUE", "x" * 100_000, "é",
    "../..", "%00", "a/b", "\r\n", "public\x00",
]
# fmt: on


@pytest.mark.parametrize("field", ["name", "visibility", "description", "overwrite", "other"])
def test_garbage_form_fields_are_never_a_500(
    client: TestClient, alice: TenantAuth, adapters: dict[str, Path], field: str
) -> None:
    files = peft_files(adapters["prefix"])

    def responses() -> Iterator[tuple[Any, Response]]:
        for value in FORM_GARBAGE:
            data = {"name": "g", field: value}
            yield data, client.post("/v1/prefixes", data=data, files=files, headers=alice.headers)

    check_all(responses())


# fmt: off
FILE_NAMES = [
    "", ".", "..", "/", "a" * 5000, "é.safetensors", "adapter_config.json/", "x.BIN", "x.PT",
    "CON", "adapter_model.safetensors\\..", "..\\..\\x.safetensors",
]
FILE_CONTENTS = [
    b"", b"\x00" * 8, b"\xff" * 64, b"{}", b"[]", b"null", b"\x80\x04N.",
    (8).to_bytes(8, "little") + b'{"a":1}', (2**64 - 1).to_bytes(8, "little"),
]
# fmt: on


def test_garbage_files_are_never_a_500(client: TestClient, alice: TenantAuth) -> None:
    def responses() -> Iterator[tuple[Any, Response]]:
        for name in FILE_NAMES:
            for content in FILE_CONTENTS:
                for companion in ([], [("files", ("adapter_config.json", content))]):
                    files = [("files", (name, content)), *companion]
                    response = client.post(
                        "/v1/prefixes", data={"name": "g"}, files=files, headers=alice.headers
                    )
                    yield (name, content, bool(companion)), response

    check_all(responses())


def test_garbage_queries_and_paths_are_never_a_500(client: TestClient, alice: TenantAuth) -> None:
    values = [
        "",
        "-1",
        "0",
        "1e308",
        "99999999999999999999999",
        "x",
        "own\x00",
        "../..",
        "a/b/c",
        "é" * 300,
        "%ff",
        "null",
        "[]",
    ]

    def responses() -> Iterator[tuple[Any, Response]]:
        for value in values:
            for param in ("limit", "scope", "cursor"):
                yield (
                    (param, value),
                    client.get("/v1/prefixes", params={param: value}, headers=alice.headers),
                )
            for path, params in (
                ("/v1/files", ("limit", "after", "purpose")),
                ("/v1/fine_tuning/jobs", ("limit", "after")),
                ("/v1/fine_tuning/jobs/ftjob-x/events", ("limit", "after")),
                ("/v1/fine_tuning/jobs/ftjob-x/checkpoints", ("limit", "after")),
            ):
                for param in params:
                    response = client.get(path, params={param: value}, headers=alice.headers)
                    yield (path, param, value), response
            segment = quote(value, safe="")
            for path in (f"/v1/prefixes/{segment}/style", f"/v1/prefixes/alice/{segment}"):
                yield ("GET", path), client.get(path, headers=alice.headers)
                yield ("DELETE", path), client.delete(path, headers=alice.headers)
            for path in (
                f"/v1/files/{segment}",
                f"/v1/files/{segment}/content",
                f"/v1/fine_tuning/jobs/{segment}",
                f"/v1/fine_tuning/jobs/{segment}/events",
                f"/v1/fine_tuning/jobs/{segment}/checkpoints",
            ):
                yield ("GET", path), client.get(path, headers=alice.headers)
            yield ("DELETE", segment), client.delete(f"/v1/files/{segment}", headers=alice.headers)
            cancel = f"/v1/fine_tuning/jobs/{segment}/cancel"
            yield ("POST", cancel), client.post(cancel, headers=alice.headers)
        for method in ("PUT", "PATCH", "DELETE"):
            yield method, client.request(method, "/v1/generate", headers=alice.headers)
        yield "no route", client.get("/v1/nothing", headers=alice.headers)

    check_all(responses())
    assert client.get("/v1/prefixes/alice/style", headers=alice.headers).status_code == 200
