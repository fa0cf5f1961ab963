"""Operations: /health before and after the model is ready, /metrics, 429 when the queue is full,
X-Request-ID."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

import server.api.app as app_module
from server.api.app import create_app
from server.models import LoadedModel
from tests.api.conftest import (
    MakeClient,
    NewTenant,
    StalledEngine,
    TenantAuth,
    Upload,
    app_settings,
    assert_error,
    bearer,
    create_tenant,
    in_background,
    wait_for,
)

# Health -------------------------------------------------------------------------------------


def test_health_is_200_with_the_model_once_ready(client: TestClient, loaded: LoadedModel) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "model": loaded.model_id}


def test_health_is_503_while_the_model_loads(
    loaded: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real background start, with a model load that waits until the test lets it finish."""
    release, loading = threading.Event(), threading.Event()

    def slow_load(*args: Any, **kwargs: Any) -> LoadedModel:
        loading.set()
        assert release.wait(10), "the test never released the load"
        return loaded

    monkeypatch.setattr(app_module, "load_model", slow_load)
    app = create_app(app_settings(tmp_path / "data"), background_start=True)
    try:
        with TestClient(app) as client:
            assert loading.wait(10)
            error = assert_error(client.get("/health"), 503, "loading")
            assert error["type"] == "unavailable"
            refused = client.post("/v1/generate", json={"prompt": [1]}, headers=bearer("k"))
            assert_error(refused, 503, "loading")
            assert refused.headers["retry-after"]
            release.set()
            wait_for(lambda: client.get("/health").status_code == 200, "the server to be ready")
            assert client.get("/health").json() == {"status": "ok", "model": loaded.model_id}
    finally:
        release.set()


def test_health_is_503_naming_a_failed_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_load(*args: Any, **kwargs: Any) -> LoadedModel:
        raise OSError("no model at /nowhere")

    monkeypatch.setattr(app_module, "load_model", broken_load)
    app = create_app(app_settings(tmp_path / "data"), background_start=False)
    with TestClient(app) as client:
        assert_error(client.get("/health"), 503, "startup failed", "no model at /nowhere")
        refused = client.post("/v1/tenants", json={"name": "a"}, headers=bearer("admin-secret"))
        assert_error(refused, 503, "no model at /nowhere")


def test_health_needs_no_key_and_the_server_stops_cleanly(make_client: MakeClient) -> None:
    with make_client() as client:
        services = client.app.state.services  # type: ignore[attr-defined]
        assert client.get("/health").status_code == 200
    assert services.ready is False and not services.engine.alive


# Metrics ------------------------------------------------------------------------------------


def test_metrics_are_prometheus_text_after_a_generation(
    client: TestClient, tenant: TenantAuth, upload_adapter: Upload
) -> None:
    upload_adapter(tenant, "style", "prefix")
    body = {"prompt": [1, 2], "prefix": "style", "max_new_tokens": 3, "temperature": 0}
    assert client.post("/v1/generate", json=body, headers=tenant.headers).status_code == 200
    client.post("/v1/generate", json={"prompt": []}, headers=tenant.headers)  # a 400

    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    for name in (
        "prefix_server_http_requests_total",
        "prefix_server_generated_tokens",
        "prefix_server_time_to_first_token_seconds_bucket",
        "prefix_server_pool_resident_bytes",
        "prefix_server_inter_token_seconds_bucket",
        "prefix_server_running_rows",
        "prefix_server_queue_depth",
        "prefix_server_pool_hits",
        "prefix_server_pool_misses",
        "prefix_server_pool_evictions",
    ):
        assert name in text, name
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    generate_200 = (("method", "POST"), ("route", "/v1/generate"), ("status", "200"))
    generate_400 = (("method", "POST"), ("route", "/v1/generate"), ("status", "400"))
    assert samples[("prefix_server_http_requests_total", generate_200)] == 1
    assert samples[("prefix_server_http_requests_total", generate_400)] == 1
    assert samples[("prefix_server_generated_tokens_total", ())] == 3
    assert samples[("prefix_server_time_to_first_token_seconds_count", ())] == 1
    assert samples[("prefix_server_pool_resident_bytes", (("tier", "device"),))] > 0


def test_the_documents_routes_have_their_own_labels_and_a_stray_slash_is_a_404(
    client: TestClient, tenant: TenantAuth
) -> None:
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/docs").status_code == 200
    assert client.get("/no/such/route").status_code == 404
    stray = client.delete(f"/v1/tenants/{tenant.name}/keys/", headers=tenant.headers,
                          follow_redirects=False)  # fmt: skip
    assert_error(stray, 404)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(client.get("/metrics").text)
        for s in family.samples
    }
    for route, method, status in (
        ("/openapi.json", "GET", "200"),
        ("/docs", "GET", "200"),
        ("unmatched", "GET", "404"),
        ("unmatched", "DELETE", "404"),
    ):
        labels = (("method", method), ("route", route), ("status", status))  # fmt: skip
        assert samples[("prefix_server_http_requests_total", labels)] == 1, route


def test_every_response_carries_a_request_id(client: TestClient) -> None:
    assert len(client.get("/health").headers["x-request-id"]) >= 8
    echoed = client.get("/health", headers={"X-Request-ID": "trace-42"})
    assert echoed.headers["x-request-id"] == "trace-42"
    assert client.get("/v1/models").headers["x-request-id"]  # errors too


# Overload -----------------------------------------------------------------------------------


@pytest.fixture
def one_slot(
    make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[TestClient, TenantAuth, StalledEngine]]:
    with make_client(num_slots=1, max_waiting=1) as client:
        engine = client.app.state.services.engine  # type: ignore[attr-defined]
        stalled = StalledEngine(engine, monkeypatch)
        try:
            yield client, create_tenant(client, "alice"), stalled
        finally:
            stalled.go()  # never leave the engine held: the lifespan drains it


@pytest.mark.parametrize("route", ["/v1/generate", "/v1/completions"])
def test_a_full_queue_is_429_with_retry_after(
    one_slot: tuple[TestClient, TenantAuth, StalledEngine], route: str
) -> None:
    client, alice, stalled = one_slot
    body: dict[str, Any] = {"prompt": [1, 2], "temperature": 0}
    body |= {"model": "tiny-llama", "max_tokens": 3} if "compl" in route else {"max_new_tokens": 3}
    with in_background(client, route, body, alice.headers) as running:
        assert stalled.stepping.wait(10)  # the first request holds the only slot
        with in_background(client, route, body, alice.headers) as queued:
            wait_for(lambda: stalled.waiting == 1, "the second request to be queued")
            refused = client.post(route, json=body, headers=alice.headers)
            error = assert_error(refused, 429, "overloaded")
            assert error["type"] == "overloaded"
            assert int(refused.headers["retry-after"]) >= 1
            streamed = client.post(route, json={**body, "stream": True}, headers=alice.headers)
            assert_error(streamed, 429, "overloaded")
            stalled.go()
    # Once the engine moves, both admitted requests complete.
    assert running["response"].status_code == 200, running["response"].text
    assert queued["response"].status_code == 200, queued["response"].text
    assert client.post(route, json=body, headers=alice.headers).status_code == 200


def test_one_tenants_bad_top_k_does_not_fail_anothers_request(
    make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    with make_client(num_slots=2) as client:
        stalled = StalledEngine(client.app.state.services.engine, monkeypatch)  # type: ignore[attr-defined]
        alice, mallory = create_tenant(client, "alice"), create_tenant(client, "mallory")
        good = {"prompt": [1, 2], "max_new_tokens": 20, "temperature": 0}
        bad = {"prompt": [3], "max_new_tokens": 2, "top_k": 2**63}
        try:
            with in_background(client, "/v1/generate", good, alice.headers) as victim:
                assert stalled.stepping.wait(10)
                with in_background(client, "/v1/generate", bad, mallory.headers) as attacker:
                    wait_for(lambda: stalled.waiting == 1 or bool(attacker), "mallory's request")
                    stalled.go()
        finally:
            stalled.go()
        assert victim["response"].status_code == 200, victim["response"].text
        assert attacker["response"].status_code == 422, attacker["response"].text


def test_the_api_pages_load_their_scripts_from_the_server_and_root_leads_to_them(
    client: TestClient,
) -> None:
    import re

    for page in ("/docs", "/redoc"):
        html = client.get(page).text
        assert not re.search(r"https?://", html.split("</head>")[0]), page  # no CDN
        assets = re.findall(r'(?:src|href)="([^"]+\.(?:js|css|png))"', html)
        assert any(asset.endswith(".js") for asset in assets), page
        for asset in assets:
            assert client.get(asset).status_code == 200, asset
    root = client.get("/", follow_redirects=False)
    assert root.status_code in (302, 307) and root.headers["location"] == "/docs"


def test_a_method_the_path_does_not_serve_is_405_with_every_method_it_does(
    client: TestClient, new_tenant: NewTenant
) -> None:
    tenant = new_tenant()
    for path, method, allowed in (
        # three routes share this path (GET, PATCH, DELETE): Allow names all, whichever answered
        ("/v1/prefixes/alice/pirate", "PUT", {"GET", "PATCH", "DELETE"}),
        ("/v1/prefixes/alice/pirate", "POST", {"GET", "PATCH", "DELETE"}),
        ("/v1/generate", "GET", {"POST"}),
        ("/v1/prefixes", "PATCH", {"GET", "POST"}),
    ):
        response = client.request(method, path, headers=tenant.headers)
        assert_error(response, 405)
        named = {m.strip() for m in response.headers["allow"].split(",")}
        assert named - {"HEAD"} == allowed, (path, method, response.headers["allow"])
