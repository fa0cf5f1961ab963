"""Training files, /v1/files: stored per tenant, checked line by line on upload (a 400 naming
the line and the problem), bounded per file and per tenant; another tenant's are 404."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.models import LoadedModel
from tests.api.conftest import MakeClient, TenantAuth, assert_error, create_tenant
from tests.api.tuning import jsonl, taught_records, upload_file, worded


@pytest.fixture
def client(make_client: MakeClient, loaded: LoadedModel) -> Iterator[TestClient]:
    with make_client(model=worded(loaded)) as test_client:
        yield test_client


@pytest.fixture
def alice(client: TestClient) -> TenantAuth:
    return create_tenant(client, "alice")


def test_upload_list_get_content_delete(client: TestClient, alice: TenantAuth) -> None:
    content = jsonl(taught_records())
    first = upload_file(client, alice, content, name="teach.jsonl")
    assert first.status_code == 200, first.text
    info = first.json()
    assert info["id"].startswith("file-") and info["object"] == "file"
    assert (info["bytes"], info["filename"], info["purpose"]) == (
        len(content), "teach.jsonl", "fine-tune"
    )  # fmt: skip
    second = upload_file(client, alice, content).json()

    listed = client.get("/v1/files", headers=alice.headers).json()
    assert [f["id"] for f in listed["data"]] == [second["id"], info["id"]]  # newest first
    assert listed["has_more"] is False and listed["object"] == "list"
    page = client.get("/v1/files", params={"limit": 1}, headers=alice.headers).json()
    assert [f["id"] for f in page["data"]] == [second["id"]] and page["has_more"] is True
    rest = client.get("/v1/files", params={"after": second["id"]}, headers=alice.headers).json()
    assert [f["id"] for f in rest["data"]] == [info["id"]]

    assert client.get(f"/v1/files/{info['id']}", headers=alice.headers).json() == info
    assert client.get(f"/v1/files/{info['id']}/content", headers=alice.headers).content == content

    deleted = client.delete(f"/v1/files/{info['id']}", headers=alice.headers)
    assert deleted.json() == {"id": info["id"], "object": "file", "deleted": True}
    assert_error(client.get(f"/v1/files/{info['id']}", headers=alice.headers), 404, info["id"])
    assert_error(client.delete(f"/v1/files/{info['id']}", headers=alice.headers), 404)


def test_chat_records_are_accepted(client: TestClient, alice: TenantAuth) -> None:
    record = {
        "messages": [
            {"role": "system", "content": "w7"},
            {"role": "user", "content": "w1 w2"},
            {"role": "assistant", "content": "w40"},
        ]
    }
    response = upload_file(client, alice, jsonl([record, record]) + b"\n\n")
    assert response.status_code == 200, response.text


BAD_FILES: list[tuple[bytes, str, int | None]] = [
    (b'{"prompt": "a", "completion": "b"}\n{oops', "line 2: not JSON", 2),
    (b"", "no", None),  # no examples
    (b"\n  \n", "no", None),
    (b"\xff\xfe", "UTF-8", None),
    (b"[1, 2]", "line 1: expected an object", 1),
    (b'{"prompt": "a"}', "line 1: completion: required", 1),
    (b'{"prompt": "a", "completion": ""}', "line 1: completion: expected a non-empty", 1),
    (b'{"prompt": 3, "completion": "b"}', "line 1: prompt: expected a non-empty string", 1),
    (b'{"prompt": "a", "completion": "b", "weight": 1}', "line 1: weight: not a field", 1),
    (b'{"text": "a"}', "line 1: expected", 1),
    (b'{"messages": "hi"}', "line 1: messages: expected a list", 1),
    (b'{"messages": [{"role": "assistant", "content": "a"}]}', "at least two", 1),
    (
        b'{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}',
        "line 1: messages: expected the last message to be a non-empty assistant reply",
        1,
    ),
    (
        b'{"messages": [{"role": "pirate", "content": "a"}, '
        b'{"role": "assistant", "content": "b"}]}',
        "line 1: messages[0].role: expected one of",
        1,
    ),
    (
        b'{"messages": [{"role": "user", "content": ["a"]}, '
        b'{"role": "assistant", "content": "b"}]}',
        "line 1: messages[0].content: expected a string",
        1,
    ),
    (
        b'{"messages": [{"role": "user", "content": "a", "name": "x"}, '
        b'{"role": "assistant", "content": "b"}]}',
        "line 1: messages[0].name: not a field",
        1,
    ),
    (b"[" * 100_000, "line 1: not JSON", 1),
    (
        b'{"prompt": "a", "completion": "b"}\n{"prompt": "\\ud800", "completion": "b"}',
        "line 2: prompt: not valid Unicode",
        2,
    ),
]


@pytest.mark.parametrize(("content", "words", "line"), BAD_FILES)
def test_a_bad_file_is_400_naming_the_line_and_the_problem(
    client: TestClient, alice: TenantAuth, content: bytes, words: str, line: int | None
) -> None:
    error = assert_error(upload_file(client, alice, content), 400, "file:", words)
    assert error["field"] == "file" and error.get("line") == line
    assert client.get("/v1/files", headers=alice.headers).json()["data"] == []


@pytest.mark.parametrize(
    ("files", "data", "status", "words"),
    [
        ({"file": ("t.jsonl", b"x")}, {"purpose": "assistants"}, 400, ("purpose", "fine-tune")),
        ({"file": ("t.jsonl", b"x")}, {}, 400, ("purpose",)),
        ({"file": ("t.jsonl", b"x")}, {"purpose": "fine-tune", "x": "1"}, 400, ("x",)),
        ({"other": ("t.jsonl", b"x")}, {"purpose": "fine-tune"}, 400, ("other",)),
        ({"purpose": (None, "fine-tune")}, {}, 400, ("file", "one file part")),
    ],
)
def test_a_bad_form_is_400_naming_the_field(
    client: TestClient,
    alice: TenantAuth,
    files: dict[str, Any],
    data: dict[str, str],
    status: int,
    words: tuple[str, ...],
) -> None:
    response = client.post("/v1/files", files=files, data=data, headers=alice.headers)
    assert_error(response, status, *words)


def test_json_instead_of_multipart_is_415(client: TestClient, alice: TenantAuth) -> None:
    response = client.post("/v1/files", json={"purpose": "fine-tune"}, headers=alice.headers)
    assert_error(response, 415, "multipart")


def test_files_are_bounded_per_file_and_per_tenant(
    make_client: MakeClient, loaded: LoadedModel
) -> None:
    settings = {
        "max_training_file_bytes": 2048,
        "max_files_per_tenant": 2,
        "max_file_bytes_per_tenant": 1500,
    }
    with make_client(model=worded(loaded), **settings) as client:
        alice, bob = create_tenant(client, "alice"), create_tenant(client, "bob")
        big = jsonl([{"prompt": "w1", "completion": "w2" * 1000}])
        assert_error(upload_file(client, alice, big), 413, "training file upload", "2048")
        record = jsonl([{"prompt": "w1", "completion": " w2" * 200}])  # 630 bytes
        for _ in range(2):
            assert upload_file(client, alice, record).status_code == 200
        error = assert_error(upload_file(client, alice, record), 422, "max_files")
        assert (error["type"], error["limit"], error["requested"]) == ("quota_exceeded", 2, 3)
        first = client.get("/v1/files", headers=alice.headers).json()["data"][0]["id"]
        assert client.delete(f"/v1/files/{first}", headers=alice.headers).status_code == 200
        larger = jsonl([{"prompt": "w1", "completion": " w2" * 300}])  # 930 bytes
        error = assert_error(upload_file(client, alice, larger), 422, "max_file_bytes")
        assert error["limit"] == 1500
        assert upload_file(client, bob, larger).status_code == 200  # bob's own budget


def test_another_tenants_file_is_404(client: TestClient, alice: TenantAuth) -> None:
    bob = create_tenant(client, "bob")
    file_id = upload_file(client, alice, jsonl(taught_records())).json()["id"]
    for method, path in [
        ("GET", f"/v1/files/{file_id}"),
        ("GET", f"/v1/files/{file_id}/content"),
        ("DELETE", f"/v1/files/{file_id}"),
    ]:
        assert_error(client.request(method, path, headers=bob.headers), 404, "not found")
    assert client.get("/v1/files", headers=bob.headers).json()["data"] == []
    assert_error(
        client.get("/v1/files", params={"after": file_id}, headers=bob.headers), 404, file_id
    )
    assert client.get(f"/v1/files/{file_id}", headers=alice.headers).status_code == 200
