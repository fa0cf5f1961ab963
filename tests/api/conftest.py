"""HTTP tests: an app on a tiny model, tenants, real PEFT adapters, and the checks they share.

One tiny model and one set of adapters serve the whole session; every test gets its own app on
its own data directory (`tmp_path`), so no test sees another's tenants or prefixes.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

try:  # the client Starlette's TestClient is built on: httpx2 where installed
    from httpx2 import Response
except ImportError:  # pragma: no cover
    from httpx import Response  # type: ignore[assignment]

from prefixes import read_upload
from server.api.app import create_app
from server.config import Settings
from server.engine.engine import Engine
from server.engine.llm import LLM
from server.engine.request import Request, SamplingParams
from server.engine.scheduler import Schedule
from server.models import LoadedModel
from tests.tiny import ADAPTER_KINDS, make_adapter, tiny_loaded

ADMIN_KEY = "admin-secret"
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# Virtual tokens of the session's adapter of each kind.
NUM_VIRTUAL_TOKENS = {kind: 4 + i for i, kind in enumerate(ADAPTER_KINDS)}
# The `kind` the API reports for each PEFT kind.
API_KIND = {
    "prefix": "prefix_tuning",
    "prefix_projection": "prefix_tuning",
    "prompt": "prompt_tuning",
    "p_tuning": "p_tuning",
}
DEFAULT_SETTINGS: dict[str, Any] = {"num_slots": 4, "max_len": 128, "max_new_tokens_limit": 64}

Files = list[tuple[str, tuple[str, bytes]]]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="session")
def loaded() -> LoadedModel:
    return tiny_loaded("llama")


@pytest.fixture(scope="session")
def adapters(loaded: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One folder per PEFT kind, as PEFT's save_pretrained wrote it."""
    root = tmp_path_factory.mktemp("adapters")
    for seed, kind in enumerate(ADAPTER_KINDS):
        make_adapter(loaded.model, kind, NUM_VIRTUAL_TOKENS[kind], root / kind, seed=seed)
    return {kind: root / kind for kind in ADAPTER_KINDS}


def peft_files(folder: Path, *, names: tuple[str, str] = (CONFIG, WEIGHTS)) -> Files:
    """The two files of a PEFT adapter under the multipart field `files` (optionally renamed)."""
    return [
        ("files", (sent, (folder / real).read_bytes()))
        for real, sent in zip((CONFIG, WEIGHTS), names, strict=True)
    ]


def app_settings(data_dir: Path, **overrides: Any) -> Settings:
    options = {"data_dir": data_dir, "admin_key": ADMIN_KEY, **DEFAULT_SETTINGS, **overrides}
    return Settings(**options)


MakeClient = Callable[..., AbstractContextManager[TestClient]]


@pytest.fixture
def make_client(loaded: LoadedModel, tmp_path: Path) -> MakeClient:
    """`with make_client(**settings) as client:` an app on a fresh data dir, engine running."""
    count = itertools.count()

    def make(*, model: LoadedModel | None = None, **overrides: Any) -> TestClient:
        data_dir = tmp_path / f"data{next(count)}"
        app = create_app(
            app_settings(data_dir, **overrides), loaded=model or loaded, background_start=False
        )
        return TestClient(app)

    return make


@pytest.fixture
def client(make_client: MakeClient) -> Iterator[TestClient]:
    with make_client() as test_client:
        yield test_client


@pytest.fixture
def admin_headers() -> dict[str, str]:
    return bearer(ADMIN_KEY)


@dataclass(frozen=True)
class TenantAuth:
    name: str
    api_key: str

    @property
    def headers(self) -> dict[str, str]:
        return bearer(self.api_key)


NewTenant = Callable[..., TenantAuth]


@pytest.fixture
def new_tenant(client: TestClient) -> NewTenant:
    """`new_tenant()` or `new_tenant("alice")`: POST /v1/tenants as the admin, return its key."""
    count = itertools.count()

    def make(name: str | None = None) -> TenantAuth:
        return create_tenant(client, name or f"tenant{next(count)}")

    return make


def create_tenant(client: TestClient, name: str) -> TenantAuth:
    response = client.post("/v1/tenants", json={"name": name}, headers=bearer(ADMIN_KEY))
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["tenant"] == name
    return TenantAuth(name, body["api_key"])


@pytest.fixture
def tenant(new_tenant: NewTenant) -> TenantAuth:
    return new_tenant("alice")


def upload(client: TestClient, who: TenantAuth, files: Files, **fields: str) -> Response:
    """POST /v1/prefixes: `files` under the field `files`, plus name/visibility/... fields."""
    return client.post("/v1/prefixes", data=fields, files=files, headers=who.headers)


Upload = Callable[..., dict[str, Any]]


@pytest.fixture
def upload_adapter(client: TestClient, adapters: dict[str, Path]) -> Upload:
    """`upload_adapter(who, name, kind="prompt", **fields)`: uploads the session's real PEFT
    adapter of that kind, asserts 201, returns the prefix object."""

    def send(who: TenantAuth, name: str, kind: str = "prompt", **fields: str) -> dict[str, Any]:
        response = upload(client, who, peft_files(adapters[kind]), name=name, **fields)
        assert response.status_code == 201, response.text
        return dict(response.json())

    return send


def assert_error(response: Response, status: int, *words: str) -> dict[str, Any]:
    """The status, the JSON error shape, and a message naming the problem (each word in it,
    case-insensitively)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error.get("type"), str) and error["type"], error
    assert isinstance(error.get("message"), str) and error["message"], error
    for word in words:
        assert word.lower() in error["message"].lower(), (word, error["message"])
    return dict(error)


def assert_client_error_shape(response: Response) -> None:
    """Anything a client sends: never a 5xx, and an error is always the JSON error shape."""
    assert response.status_code < 500, (response.status_code, response.text)
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["type"], str) and isinstance(error["message"], str), error


def registry_state(client: TestClient, who: TenantAuth) -> tuple[Any, list[str]]:
    """What the tenant can list (GET /v1/prefixes, every scope) and the blob files on disk."""
    listed = client.get("/v1/prefixes", params={"scope": "all", "limit": 1000}, headers=who.headers)
    assert listed.status_code == 200, listed.text
    data_dir: Path = client.app.state.services.settings.data_dir  # type: ignore[attr-defined]
    blobs = sorted(str(p.relative_to(data_dir)) for p in (data_dir / "blobs").rglob("*.*"))
    return listed.json(), blobs


def listed_ids(client: TestClient, who: TenantAuth, scope: str = "all") -> list[str]:
    response = client.get(
        "/v1/prefixes", params={"scope": scope, "limit": 1000}, headers=who.headers
    )
    assert response.status_code == 200, response.text
    return [p["id"] for p in response.json()["data"]]


def alone(
    loaded: LoadedModel, prompt: list[int], files: Files | None, n: int, **sampling: Any
) -> list[int]:
    """The tokens the engine generates for this request run alone (the reference): greedy
    unless `sampling` says otherwise, the prefix compiled from the uploaded files."""
    compiled = None
    if files is not None:
        compiled = loaded.compile(read_upload({name: data for _, (name, data) in files}), 256)
    params = SamplingParams(max_new_tokens=n, **{"temperature": 0, **sampling})
    llm = LLM(loaded, num_slots=1, max_len=128)
    (request,) = llm.generate([Request(prompt, params, prefix=compiled)])
    assert request.finish_reason == "length"
    return list(request.output_token_ids)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


class StalledEngine:
    """Holds the engine thread in each step that admits requests, once they are admitted and
    before the forward, until `go()`: what is admitted stays in flight, what comes after waits
    in the queue. Deterministic."""

    def __init__(self, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
        self.engine = engine
        self.stepping = threading.Event()
        self._go = threading.Event()
        prepare = engine.core._prepare

        def held_prepare(plan: Schedule) -> Any:
            if plan.admitted:
                self.stepping.set()
                assert self._go.wait(60), "the test never let the engine go"
            return prepare(plan)

        monkeypatch.setattr(engine.core, "_prepare", held_prepare)

    @property
    def waiting(self) -> int:
        """Submitted and not yet admitted."""
        return sum(self.engine.waiting_per_tenant().values())

    def go(self) -> None:
        self._go.set()


@contextmanager
def in_background(
    client: TestClient, path: str, body: dict, headers: dict[str, str]
) -> Iterator[dict[str, Response]]:
    """POST from another thread; the response is in the dict after the block."""
    result: dict[str, Response] = {}
    thread = threading.Thread(
        target=lambda: result.update(response=client.post(path, json=body, headers=headers))
    )
    thread.start()
    try:
        yield result
    finally:
        thread.join(20)
        assert not thread.is_alive()
