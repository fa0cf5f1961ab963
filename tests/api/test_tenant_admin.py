"""Keys and quotas over HTTP: rotation by the admin or by the tenant itself, revocation that
takes effect at once, and quotas the admin sets and the next upload obeys."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from prefixes.catalog.records import DEFAULT_QUOTAS, QUOTA_LIMITS
from server.api.routes.tenants import TENANT_MAX_ACTIVE_KEYS
from tests.api.conftest import (
    ADMIN_KEY,
    NUM_VIRTUAL_TOKENS,
    MakeClient,
    NewTenant,
    TenantAuth,
    Upload,
    assert_error,
    bearer,
    peft_files,
    upload,
)


def keys(client: TestClient, name: str, headers: dict[str, str]) -> list[dict[str, Any]]:
    response = client.get(f"/v1/tenants/{name}/keys", headers=headers)
    assert response.status_code == 200, response.text
    assert set(response.json()) == {"data"}
    return list(response.json()["data"])


def issue(client: TestClient, name: str, headers: dict[str, str]) -> dict[str, Any]:
    response = client.post(f"/v1/tenants/{name}/keys", headers=headers)
    assert response.status_code == 201, response.text
    body = dict(response.json())
    assert set(body) == {"tenant", "key_id", "api_key"} and body["tenant"] == name
    return body


def works(client: TestClient, api_key: str) -> bool:
    """Whether a tenant route accepts the key (200), or refuses it as unknown (401)."""
    response = client.get("/v1/prefixes", headers=bearer(api_key))
    assert response.status_code in (200, 401), response.text
    return response.status_code == 200


def patch(client: TestClient, name: str, body: object) -> Any:
    return client.patch(f"/v1/tenants/{name}", json=body, headers=bearer(ADMIN_KEY))


@pytest.mark.parametrize("rotated_by", ["admin", "tenant"])
def test_a_rotated_key_works_and_the_revoked_one_is_refused_at_once(
    client: TestClient, new_tenant: NewTenant, admin_headers: dict[str, str], rotated_by: str
) -> None:
    alice, bob = new_tenant("alice"), new_tenant("bob")
    (first,) = keys(client, "alice", admin_headers)
    assert (first["revoked"], first["current"]) == (False, False)  # the admin's key is not hers

    headers = admin_headers if rotated_by == "admin" else alice.headers
    second = issue(client, "alice", headers)
    assert second["api_key"] != alice.api_key and second["key_id"] != first["key_id"]
    assert works(client, second["api_key"]) and works(client, alice.api_key)  # both, meanwhile

    listed = keys(client, "alice", bearer(second["api_key"]))
    assert [(k["key_id"], k["revoked"], k["current"]) for k in listed] == [
        (first["key_id"], False, False),
        (second["key_id"], False, True),  # the key this listing was asked with
    ]
    assert set(listed[0]) == {"key_id", "created_at", "revoked", "current"}  # never the secret

    revoked = client.delete(f"/v1/tenants/alice/keys/{first['key_id']}", headers=headers)
    assert revoked.status_code == 204, revoked.text
    assert not works(client, alice.api_key)  # at once
    assert_error(client.get("/v1/tenants/alice/keys", headers=alice.headers), 401)
    assert works(client, second["api_key"]) and works(client, bob.api_key)
    assert [k["revoked"] for k in keys(client, "alice", admin_headers)] == [True, False]

    again = client.delete(f"/v1/tenants/alice/keys/{first['key_id']}", headers=admin_headers)
    assert_error(again, 404, "no active key", first["key_id"])


def test_a_tenant_may_not_revoke_its_last_active_key_but_the_admin_may(
    client: TestClient, tenant: TenantAuth, admin_headers: dict[str, str]
) -> None:
    (only,) = keys(client, tenant.name, tenant.headers)
    assert only["current"]
    path = f"/v1/tenants/{tenant.name}/keys/{only['key_id']}"
    error = assert_error(client.delete(path, headers=tenant.headers), 409, "last active key")
    assert error["type"] == "conflict"
    assert works(client, tenant.api_key)

    # Revoking the key one is using is fine while another stays: the last step of a rotation.
    spare = issue(client, tenant.name, tenant.headers)
    assert client.delete(path, headers=tenant.headers).status_code == 204
    assert not works(client, tenant.api_key)

    # The admin may leave a tenant with no key at all (a compromised tenant), and issue anew.
    spare_path = f"/v1/tenants/{tenant.name}/keys/{spare['key_id']}"
    assert client.delete(spare_path, headers=admin_headers).status_code == 204
    assert not works(client, spare["api_key"])
    assert works(client, issue(client, tenant.name, admin_headers)["api_key"])


def test_a_tenant_issues_a_limited_number_of_active_keys_itself(
    client: TestClient, tenant: TenantAuth, admin_headers: dict[str, str]
) -> None:
    for _ in range(TENANT_MAX_ACTIVE_KEYS - 1):
        issue(client, tenant.name, tenant.headers)
    response = client.post(f"/v1/tenants/{tenant.name}/keys", headers=tenant.headers)
    assert_error(response, 409, "active keys", "revoke one first")
    assert len(keys(client, tenant.name, admin_headers)) == TENANT_MAX_ACTIVE_KEYS

    newest = keys(client, tenant.name, tenant.headers)[-1]
    revoked = client.delete(
        f"/v1/tenants/{tenant.name}/keys/{newest['key_id']}", headers=tenant.headers
    )
    assert revoked.status_code == 204
    issue(client, tenant.name, tenant.headers)  # room again
    issue(client, tenant.name, admin_headers)  # and the admin is not limited


def test_a_tenant_key_reaches_its_own_tenant_only(
    client: TestClient, new_tenant: NewTenant, admin_headers: dict[str, str]
) -> None:
    alice, bob = new_tenant("alice"), new_tenant("bob")
    (alice_key,) = keys(client, "alice", admin_headers)
    for name in ("alice", "nobody"):  # the same answer whether the tenant exists or not
        for method, path in [
            ("GET", f"/v1/tenants/{name}"),
            ("GET", f"/v1/tenants/{name}/keys"),
            ("POST", f"/v1/tenants/{name}/keys"),
            ("DELETE", f"/v1/tenants/{name}/keys/{alice_key['key_id']}"),
        ]:
            response = client.request(method, path, headers=bob.headers)
            error = assert_error(response, 403, "own tenant only")
            assert error["type"] == "forbidden"
    assert keys(client, "alice", admin_headers) == [alice_key] and works(client, alice.api_key)

    # Quotas are the admin's: a tenant key, even on its own tenant, is not the admin key.
    for who in (alice, bob):
        response = client.patch("/v1/tenants/alice", json={"max_prefixes": 1}, headers=who.headers)
        assert_error(response, 401, "admin key")
    assert client.get("/v1/tenants/alice", headers=alice.headers).json()["quotas"] == {
        "max_prefixes": DEFAULT_QUOTAS.max_prefixes,
        "max_bytes": DEFAULT_QUOTAS.max_bytes,
        "max_virtual_tokens": DEFAULT_QUOTAS.max_virtual_tokens,
    }


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/tenants/alice"),
        ("PATCH", "/v1/tenants/alice"),
        ("GET", "/v1/tenants/alice/keys"),
        ("POST", "/v1/tenants/alice/keys"),
        ("DELETE", "/v1/tenants/alice/keys/0123456789ab"),
    ],
)
def test_no_key_or_an_unknown_key_is_401(
    client: TestClient, tenant: TenantAuth, method: str, path: str
) -> None:
    body = {"json": {"max_prefixes": 1}} if method == "PATCH" else {}
    no_key = client.request(method, path, **body)
    assert_error(no_key, 401, "API key")
    assert no_key.headers["www-authenticate"] == "Bearer"
    for wrong in ("psk_wrong", ADMIN_KEY + "x", tenant.api_key + "x"):
        response = client.request(method, path, headers=bearer(wrong), **body)
        assert_error(response, 401, "invalid")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/tenants/nobody"),
        ("PATCH", "/v1/tenants/nobody"),
        ("GET", "/v1/tenants/nobody/keys"),
        ("POST", "/v1/tenants/nobody/keys"),
        ("DELETE", "/v1/tenants/nobody/keys/0123456789ab"),
    ],
)
def test_an_unknown_tenant_is_404(
    client: TestClient, admin_headers: dict[str, str], method: str, path: str
) -> None:
    body = {"json": {"max_prefixes": 1}} if method == "PATCH" else {}
    response = client.request(method, path, headers=admin_headers, **body)
    error = assert_error(response, 404, "tenant 'nobody' does not exist")
    assert error["type"] == "not_found"


def test_an_unknown_key_id_is_404_and_another_tenants_key_is_not_revoked(
    client: TestClient, new_tenant: NewTenant, admin_headers: dict[str, str]
) -> None:
    alice, _ = new_tenant("alice"), new_tenant("bob")
    (alice_key,) = keys(client, "alice", admin_headers)
    for key_id in ("0123456789ab", alice_key["key_id"]):  # none of bob's
        response = client.delete(f"/v1/tenants/bob/keys/{key_id}", headers=admin_headers)
        assert_error(response, 404, "no active key", key_id)
    assert works(client, alice.api_key)


def test_quotas_set_through_the_api_hold_for_the_next_upload(
    client: TestClient, tenant: TenantAuth, upload_adapter: Upload, adapters: dict[str, Any]
) -> None:
    first = upload_adapter(tenant, "one")
    capped = patch(client, tenant.name, {"max_prefixes": 1})
    assert capped.status_code == 200, capped.text
    assert capped.json()["quotas"]["max_prefixes"] == 1
    assert capped.json()["usage"] == {"prefixes": 1, "bytes": first["bytes"]}

    refused = upload(client, tenant, peft_files(adapters["prompt"]), name="two")
    error = assert_error(refused, 422, "max_prefixes")
    assert (error["type"], error["limit"], error["requested"]) == ("quota_exceeded", 1, 2)

    assert patch(client, tenant.name, {"max_prefixes": 2}).status_code == 200
    second = upload_adapter(tenant, "two")

    # Bytes: exactly what is stored leaves no room; virtual tokens: per prefix, checked on read.
    assert patch(client, tenant.name, {"max_bytes": first["bytes"] + second["bytes"]}).is_success
    assert patch(client, tenant.name, {"max_prefixes": None}).is_success
    error = assert_error(upload(client, tenant, peft_files(adapters["prompt"]), name="three"), 422)
    assert (error["type"], error["field"]) == ("quota_exceeded", "max_bytes")

    tokens = NUM_VIRTUAL_TOKENS["prompt"]
    body = {"max_bytes": None, "max_virtual_tokens": tokens - 1}
    assert patch(client, tenant.name, body).is_success
    refused = upload(client, tenant, peft_files(adapters["prompt"]), name="three")
    assert_error(refused, 422, f"max_virtual_tokens = {tokens - 1}, this upload needs {tokens}")
    assert patch(client, tenant.name, {"max_virtual_tokens": tokens}).is_success
    upload_adapter(tenant, "three")

    shown = client.get(f"/v1/tenants/{tenant.name}", headers=tenant.headers)
    assert shown.status_code == 200, shown.text
    assert shown.json()["usage"]["prefixes"] == 3


def test_a_quota_patch_changes_only_the_fields_sent_and_null_restores_the_default(
    client: TestClient, tenant: TenantAuth
) -> None:
    def quotas(body: object) -> dict[str, Any]:
        response = patch(client, tenant.name, body)
        assert response.status_code == 200, response.text
        assert response.json()["tenant"] == tenant.name
        return dict(response.json()["quotas"])

    defaults = {
        "max_prefixes": DEFAULT_QUOTAS.max_prefixes,
        "max_bytes": DEFAULT_QUOTAS.max_bytes,
        "max_virtual_tokens": DEFAULT_QUOTAS.max_virtual_tokens,
    }
    assert quotas({}) == defaults
    assert quotas({"max_prefixes": 5}) == {**defaults, "max_prefixes": 5}
    assert quotas({"max_bytes": 0, "max_virtual_tokens": 8}) == {
        "max_prefixes": 5,
        "max_bytes": 0,
        "max_virtual_tokens": 8,
    }
    assert quotas({"max_prefixes": None, "max_bytes": None}) == {
        **defaults,
        "max_virtual_tokens": 8,
    }
    top = {name: QUOTA_LIMITS[name] for name in defaults}
    assert quotas(top) == top


@pytest.mark.parametrize(
    "body",
    [
        {"max_prefixes": -1},
        {"max_prefixes": "5"},
        {"max_prefixes": 1.5},
        {"max_prefixes": True},
        {"max_prefixes": QUOTA_LIMITS["max_prefixes"] + 1},
        {"max_bytes": QUOTA_LIMITS["max_bytes"] + 1},
        {"max_virtual_tokens": [4]},
        {"max_requests": 5},
        [],
        "max_prefixes=5",
    ],
    ids=[
        "negative",
        "string",
        "fraction",
        "boolean",
        "over-int32",
        "over-int64",
        "list",
        "unknown-field",
        "not-an-object",
        "string-body",
    ],
)
def test_invalid_quota_values_are_422_and_change_nothing(
    client: TestClient, tenant: TenantAuth, body: object
) -> None:
    before = client.get(f"/v1/tenants/{tenant.name}", headers=tenant.headers).json()
    # A valid change beside the invalid one is not applied either.
    sent = {"max_prefixes": 7, **body} if isinstance(body, dict) else body
    error = assert_error(patch(client, tenant.name, sent), 422)
    assert error["type"] == "invalid_request" and error["details"], error
    if isinstance(body, dict):
        (field,) = body
        assert field in {d["field"] for d in error["details"]}, error
    assert client.get(f"/v1/tenants/{tenant.name}", headers=tenant.headers).json() == before


def test_the_admin_and_the_tenant_read_its_quotas_and_usage(
    client: TestClient, tenant: TenantAuth, upload_adapter: Upload, admin_headers: dict[str, str]
) -> None:
    uploaded = [upload_adapter(tenant, "one"), upload_adapter(tenant, "two", kind="prefix")]
    upload_adapter(tenant, "one", overwrite="true")  # replaces: counted once
    client.delete(f"/v1/prefixes/{tenant.name}/two", headers=tenant.headers)
    for headers in (admin_headers, tenant.headers):
        shown = client.get(f"/v1/tenants/{tenant.name}", headers=headers)
        assert shown.status_code == 200, shown.text
        body = shown.json()
        assert set(body) == {"tenant", "created_at", "quotas", "rate_limits", "usage"}
        assert body["tenant"] == tenant.name
        assert body["usage"] == {"prefixes": 1, "bytes": uploaded[0]["bytes"]}


def test_without_an_admin_key_a_tenant_still_rotates_its_own_key(make_client: MakeClient) -> None:
    with make_client(admin_key=None) as no_admin:
        issued = no_admin.app.state.services.registry.create_tenant("alice")  # type: ignore[attr-defined]
        alice = TenantAuth("alice", issued.api_key)
        second = issue(no_admin, "alice", alice.headers)
        path = f"/v1/tenants/alice/keys/{issued.key_id}"
        assert no_admin.delete(path, headers=bearer(second["api_key"])).status_code == 204
        assert not works(no_admin, alice.api_key) and works(no_admin, second["api_key"])
        response = no_admin.patch("/v1/tenants/alice", json={}, headers=bearer(second["api_key"]))
        assert_error(response, 403, "no admin key")
