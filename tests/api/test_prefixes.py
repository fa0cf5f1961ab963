"""GET /v1/prefixes (pages, scopes), GET, PATCH and DELETE /v1/prefixes/{owner}/{name}."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import NewTenant, TenantAuth, Upload, assert_error, listed_ids


def pages(client: TestClient, who: TenantAuth, **params: Any) -> list[list[str]]:
    """Every page of the listing, following `next` until it is null."""
    result, cursor = [], None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        response = client.get("/v1/prefixes", params=query, headers=who.headers)
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == {"data", "next"}
        result.append([p["id"] for p in body["data"]])
        cursor = body["next"]
        if cursor is None:
            return result
        assert len(result) < 50, "the cursor does not advance"


@pytest.fixture
def shelves(new_tenant: NewTenant, upload_adapter: Upload) -> tuple[TenantAuth, TenantAuth]:
    """ann: a1 private, a2 public, a3 public; bob: b1 public, b2 private."""
    ann, bob = new_tenant("ann"), new_tenant("bob")
    upload_adapter(ann, "a1", "prefix")
    upload_adapter(ann, "a2", "prompt", visibility="public")
    upload_adapter(ann, "a3", "p_tuning", visibility="public")
    upload_adapter(bob, "b1", "prefix_projection", visibility="public")
    upload_adapter(bob, "b2", "prompt")
    return ann, bob


def test_scopes(client: TestClient, shelves: tuple[TenantAuth, TenantAuth]) -> None:
    ann, bob = shelves
    assert listed_ids(client, bob, "own") == ["bob/b1", "bob/b2"]
    assert listed_ids(client, bob, "public") == ["ann/a2", "ann/a3", "bob/b1"]
    assert listed_ids(client, bob, "all") == ["ann/a2", "ann/a3", "bob/b1", "bob/b2"]
    assert listed_ids(client, ann, "all") == ["ann/a1", "ann/a2", "ann/a3", "bob/b1"]
    default = client.get("/v1/prefixes", headers=bob.headers).json()
    assert [p["id"] for p in default["data"]] == listed_ids(client, bob, "all")
    assert default["next"] is None


@pytest.mark.parametrize("scope", ["own", "public", "all"])
@pytest.mark.parametrize("limit", [1, 2, 3])
def test_pages_follow_the_next_cursor(
    client: TestClient, shelves: tuple[TenantAuth, TenantAuth], scope: str, limit: int
) -> None:
    ann, _ = shelves
    paged = pages(client, ann, scope=scope, limit=limit)
    assert all(len(page) <= limit for page in paged)
    assert all(len(page) == limit for page in paged[:-1])
    assert [i for page in paged for i in page] == listed_ids(client, ann, scope)


def test_listed_objects_are_the_prefix_objects(
    client: TestClient, tenant: TenantAuth, upload_adapter: Upload
) -> None:
    info = upload_adapter(tenant, "one", "prefix", description="d")
    assert client.get("/v1/prefixes", headers=tenant.headers).json() == {
        "data": [info],
        "next": None,
    }


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"scope": "mine"}, ("scope", "mine")),
        ({"limit": 0}, ("limit",)),
        ({"limit": 1001}, ("limit", "1000")),
        ({"limit": "ten"}, ("limit",)),
        ({"cursor": "Not/A/Ref"}, ("prefix",)),
    ],
)
def test_bad_listing_parameters_are_422(
    client: TestClient, tenant: TenantAuth, params: dict, words: tuple[str, ...]
) -> None:
    response = client.get("/v1/prefixes", params=params, headers=tenant.headers)
    assert_error(response, 422, *words)


def test_get_by_owner_and_name(client: TestClient, shelves: tuple[TenantAuth, TenantAuth]) -> None:
    ann, bob = shelves
    own = client.get("/v1/prefixes/ann/a1", headers=ann.headers)
    assert own.status_code == 200
    assert own.json()["id"] == "ann/a1" and own.json()["visibility"] == "private"
    public = client.get("/v1/prefixes/ann/a2", headers=bob.headers)
    assert public.status_code == 200 and public.json()["kind"] == "prompt_tuning"
    assert_error(client.get("/v1/prefixes/ann/nothing", headers=ann.headers), 404, "ann/nothing")
    assert_error(client.get("/v1/prefixes/nobody/a1", headers=ann.headers), 404, "nobody/a1")


def test_get_with_an_invalid_name_is_422(client: TestClient, tenant: TenantAuth) -> None:
    assert_error(client.get("/v1/prefixes/alice/UPPER", headers=tenant.headers), 422, "UPPER")
    assert_error(client.get("/v1/prefixes/%2e%2e/x", headers=tenant.headers), 422, "owner")


def test_delete_is_204_then_404(
    client: TestClient, tenant: TenantAuth, upload_adapter: Upload
) -> None:
    upload_adapter(tenant, "gone", "prefix")
    upload_adapter(tenant, "stays", "prompt")
    deleted = client.delete("/v1/prefixes/alice/gone", headers=tenant.headers)
    assert deleted.status_code == 204 and deleted.content == b""
    assert_error(client.get("/v1/prefixes/alice/gone", headers=tenant.headers), 404, "alice/gone")
    assert_error(
        client.delete("/v1/prefixes/alice/gone", headers=tenant.headers), 404, "alice/gone"
    )
    assert listed_ids(client, tenant) == ["alice/stays"]
    body = {"prompt": [1, 2], "prefix": "alice/gone", "max_new_tokens": 2}
    assert_error(client.post("/v1/generate", json=body, headers=tenant.headers), 404, "alice/gone")
    models = client.get("/v1/models", headers=tenant.headers).json()["data"]
    assert "alice/gone" not in {m["id"] for m in models}


def test_a_deleted_name_can_be_uploaded_again(
    client: TestClient, tenant: TenantAuth, upload_adapter: Upload
) -> None:
    upload_adapter(tenant, "again", "prefix")
    assert client.delete("/v1/prefixes/alice/again", headers=tenant.headers).status_code == 204
    info = upload_adapter(tenant, "again", "prompt")
    assert info["kind"] == "prompt_tuning"
    assert client.get("/v1/prefixes/alice/again", headers=tenant.headers).json() == info


def test_an_unknown_scope_is_refused_and_the_document_lists_the_scopes(
    client: TestClient, shelves: tuple[TenantAuth, TenantAuth]
) -> None:
    ann, _ = shelves
    response = client.get("/v1/prefixes", params={"scope": "everyone"}, headers=ann.headers)
    assert response.status_code == 422, response.text
    assert "scope" in response.json()["error"]["message"]
    parameters = client.get("/openapi.json").json()["paths"]["/v1/prefixes"]["get"]["parameters"]
    (scope,) = [p for p in parameters if p["name"] == "scope"]
    assert scope["schema"]["enum"] == ["own", "public", "all"]


def test_patch_changes_visibility_and_description_in_place(
    client: TestClient, shelves: tuple[TenantAuth, TenantAuth]
) -> None:
    ann, bob = shelves
    before = client.get("/v1/prefixes/ann/a1", headers=ann.headers).json()
    use = {"prompt": [1, 2, 3], "prefix": "ann/a1", "max_new_tokens": 2, "temperature": 0}
    assert_error(client.post("/v1/generate", json=use, headers=bob.headers), 404, "ann/a1")

    shared = client.patch(
        "/v1/prefixes/ann/a1",
        json={"visibility": "public", "description": "<b>shared</b>"},
        headers=ann.headers,
    )
    assert shared.status_code == 200, shared.text
    after = shared.json()
    assert (after["visibility"], after["description"]) == ("public", "<b>shared</b>")
    same = ("version", "sha256", "bytes", "created_at")  # in place: the same version and files
    assert {k: after[k] for k in same} == {k: before[k] for k in same}
    assert client.post("/v1/generate", json=use, headers=bob.headers).status_code == 200
    assert "ann/a1" in listed_ids(client, bob, "public")

    hidden = client.patch(
        "/v1/prefixes/ann/a1", json={"visibility": "private"}, headers=ann.headers
    )
    assert hidden.json()["description"] == "<b>shared</b>"  # absent fields stay as they were
    assert_error(client.post("/v1/generate", json=use, headers=bob.headers), 404, "ann/a1")
    assert "ann/a1" not in listed_ids(client, bob, "all")


def test_patch_is_the_owners_alone_and_checks_its_fields(
    client: TestClient, shelves: tuple[TenantAuth, TenantAuth]
) -> None:
    ann, bob = shelves
    for ref in ("ann/a2", "ann/a1", "ann/nothing"):  # public, private, missing: one answer
        assert_error(
            client.patch(
                f"/v1/prefixes/{ref}", json={"visibility": "private"}, headers=bob.headers
            ),
            404,
            ref,
        )
    assert client.get("/v1/prefixes/ann/a2", headers=bob.headers).json()["visibility"] == "public"
    for body, field in [
        ({"visibility": "everyone"}, "visibility"),
        ({"description": "x" * 1025}, "description"),
        ({"name": "renamed"}, "name"),
    ]:
        assert_error(
            client.patch("/v1/prefixes/ann/a1", json=body, headers=ann.headers), 422, field
        )
    assert client.get("/v1/prefixes/ann/a1", headers=ann.headers).json()["visibility"] == "private"
