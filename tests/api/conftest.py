"""An app on a tiny model, tenants and real PEFT adapters for the HTTP tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.config import Settings
from server.models import LoadedModel
from tests.tiny import ADAPTER_KINDS, make_adapter, tiny_loaded

ADMIN = "admin-secret"


@pytest.fixture(scope="session")
def loaded() -> LoadedModel:
    return tiny_loaded("llama")


@pytest.fixture(scope="session")
def adapters(loaded: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    for i, kind in enumerate(ADAPTER_KINDS):
        make_adapter(loaded.model, kind, 4 + i, root / kind, seed=i)
    return {kind: root / kind for kind in ADAPTER_KINDS}


def peft_files(folder: Path) -> list[tuple[str, tuple[str, bytes]]]:
    names = ("adapter_config.json", "adapter_model.safetensors")
    return [("files", (name, (folder / name).read_bytes())) for name in names]


def make_client(loaded: LoadedModel, data_dir: Path, **settings: object) -> TestClient:
    options = {"num_slots": 4, "max_len": 128, "max_new_tokens_limit": 64, **settings}
    app = create_app(
        Settings(data_dir=data_dir, admin_key=ADMIN, **options),  # type: ignore[arg-type]
        loaded=loaded,
        background_start=False,
    )
    return TestClient(app)


@pytest.fixture(scope="module")
def client(loaded: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with make_client(loaded, tmp_path_factory.mktemp("data")) as test_client:
        yield test_client


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


_count = iter(range(10**6))


@pytest.fixture
def tenant(client: TestClient) -> Callable[[], tuple[str, dict[str, str]]]:
    """Makes a fresh tenant; returns (name, its auth headers)."""

    def make() -> tuple[str, dict[str, str]]:
        name = f"t{next(_count)}"
        response = client.post("/v1/tenants", json={"name": name}, headers=auth(ADMIN))
        assert response.status_code == 201, response.text
        return name, auth(response.json()["api_key"])

    return make


def assert_error(response, status: int, *words: str) -> dict:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"type", "message"}
    for word in words:
        assert word in error["message"], (word, error["message"])
    return error
