"""POST /v1/tenants: only the admin creates tenants; the key is shown once and stored hashed."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import (
    ADMIN_KEY,
    MakeClient,
    NewTenant,
    TenantAuth,
    assert_error,
    bearer,
    listed_ids,
)


def test_admin_creates_a_tenant_and_gets_its_key_once(
    client: TestClient, admin_headers: dict[str, str]
) -> None:
    created = client.post("/v1/tenants", json={"name": "alice"}, headers=admin_headers)
    assert created.status_code == 201, created.text
    body = created.json()
    assert set(body) == {"tenant", "api_key"}
    assert body["tenant"] == "alice"
    assert isinstance(body["api_key"], str) and len(body["api_key"]) >= 32
    alice = TenantAuth("alice", body["api_key"])
    assert listed_ids(client, alice) == []  # the key works at once

    again = client.post("/v1/tenants", json={"name": "alice"}, headers=admin_headers)
    error = assert_error(again, 409, "alice", "exists")
    assert body["api_key"] not in again.text and "api_key" not in error  # never shown again

    # Stored hashed: the key appears in no file of the data directory.
    data_dir: Path = client.app.state.services.settings.data_dir  # type: ignore[attr-defined]
    for path in data_dir.rglob("*"):
        if path.is_file():
            assert body["api_key"].encode() not in path.read_bytes(), path


def test_every_tenant_gets_its_own_key(new_tenant: NewTenant) -> None:
    keys = {new_tenant().api_key for _ in range(3)}
    assert len(keys) == 3


@pytest.mark.parametrize(
    "name", ["Alice", "../x", "", "a" * 65, "a b", "-x", ".x", "a/b", "é", "x\x00"]
)
def test_invalid_tenant_names_are_422(
    client: TestClient, admin_headers: dict[str, str], name: str
) -> None:
    response = client.post("/v1/tenants", json={"name": name}, headers=admin_headers)
    error = assert_error(response, 422, "tenant")
    assert "a-z0-9" in error["message"]  # names the rule


@pytest.mark.parametrize(
    "body",
    [{}, {"name": 5}, {"name": None}, {"name": ["a"]}, {"name": "ok", "quota": 1}, []],
    ids=["missing", "int", "null", "list", "unknown-field", "not-an-object"],
)
def test_malformed_tenant_bodies_are_422(
    client: TestClient, admin_headers: dict[str, str], body: object
) -> None:
    response = client.post("/v1/tenants", json=body, headers=admin_headers)
    error = assert_error(response, 422)
    assert error["details"], error


def test_no_key_or_a_wrong_admin_key_is_401(client: TestClient) -> None:
    body = {"name": "mallory"}
    no_key = client.post("/v1/tenants", json=body)
    assert_error(no_key, 401, "API key")
    assert no_key.headers["www-authenticate"] == "Bearer"
    assert_error(client.post("/v1/tenants", json=body, headers=bearer("wrong")), 401, "admin key")
    assert_error(
        client.post("/v1/tenants", json=body, headers={"Authorization": f"Basic {ADMIN_KEY}"}),
        401,
        "API key",
    )
    assert_error(
        client.post("/v1/tenants", json=body, headers=bearer(ADMIN_KEY + "x")), 401, "admin key"
    )


def test_a_tenant_key_is_not_an_admin_key(client: TestClient, tenant: TenantAuth) -> None:
    response = client.post("/v1/tenants", json={"name": "mallory"}, headers=tenant.headers)
    assert_error(response, 401, "admin key")
    # ... and nothing was created: the admin can still take the name.
    created = client.post("/v1/tenants", json={"name": "mallory"}, headers=bearer(ADMIN_KEY))
    assert created.status_code == 201


def test_the_admin_key_is_not_a_tenant_key(client: TestClient) -> None:
    assert_error(client.get("/v1/prefixes", headers=bearer(ADMIN_KEY)), 401, "invalid API key")


def test_without_an_admin_key_configured_tenants_cannot_be_created(
    make_client: MakeClient,
) -> None:
    with make_client(admin_key=None) as no_admin:
        response = no_admin.post("/v1/tenants", json={"name": "x"}, headers=bearer("anything"))
        assert_error(response, 403, "admin key")
