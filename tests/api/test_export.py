"""GET /v1/prefixes/{owner}/{name}/adapter: a prefix leaves the server as the PEFT folder it came
in as. PEFT loads the export on the same base model and generates what the server generates
and what the original upload generated; uploading the export again is the same prefix."""

from __future__ import annotations

import copy
import io
import zipfile
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from peft import PeftModel

from server.models import LoadedModel
from tests.api.conftest import (
    CONFIG,
    WEIGHTS,
    MakeClient,
    NewTenant,
    TenantAuth,
    Upload,
    assert_error,
    create_tenant,
    upload,
)
from tests.api.tuning import start_job, wait_status, worded
from tests.tiny import ADAPTER_KINDS, peft_greedy

PROMPT = [5, 17, 200, 33, 9]
NEW_TOKENS = 8


def export(client: TestClient, who: TenantAuth, ref: str, **params: Any) -> dict[str, bytes]:
    """The archive's files, by name."""
    response = client.get(f"/v1/prefixes/{ref}/adapter", params=params, headers=who.headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def unpack(files: dict[str, bytes], folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def peft_tokens(loaded: LoadedModel, folder: Path) -> list[int]:
    """What PEFT itself generates with the adapter in `folder` on a copy of the served model."""
    model = PeftModel.from_pretrained(copy.deepcopy(loaded.model), folder)
    return peft_greedy(model, PROMPT, NEW_TOKENS)


def served_tokens(client: TestClient, who: TenantAuth, ref: str) -> list[int]:
    body = {"prompt": PROMPT, "prefix": ref, "max_new_tokens": NEW_TOKENS, "temperature": 0}
    response = client.post("/v1/generate", json=body, headers=who.headers)
    assert response.status_code == 200, response.text
    return list(response.json()["token_ids"])


def reupload(client: TestClient, who: TenantAuth, files: dict[str, bytes], name: str) -> Any:
    sent = [("files", (file_name, data)) for file_name, data in files.items()]
    response = upload(client, who, sent, name=name)
    assert response.status_code == 201, response.text
    return response.json()


@pytest.mark.parametrize("kind", ADAPTER_KINDS)
def test_an_exported_adapter_loads_in_peft_and_generates_as_served_and_as_uploaded(
    client: TestClient,
    tenant: TenantAuth,
    upload_adapter: Upload,
    adapters: dict[str, Path],
    loaded: LoadedModel,
    tmp_path: Path,
    kind: str,
) -> None:
    original = upload_adapter(tenant, "mine", kind)
    files = export(client, tenant, "alice/mine")
    assert sorted(files) == [CONFIG, WEIGHTS]

    exported = peft_tokens(loaded, unpack(files, tmp_path / "export"))
    assert exported == served_tokens(client, tenant, "alice/mine")
    assert exported == peft_tokens(loaded, adapters[kind])

    again = reupload(client, tenant, files, "again")
    assert (again["kind"], again["sha256"]) == (original["kind"], original["sha256"])
    # A fixed point: the re-uploaded export exports to the same bytes.
    assert export(client, tenant, "alice/again") == files


def test_a_public_prefix_exports_for_anyone_a_private_one_for_its_owner_only(
    client: TestClient, new_tenant: NewTenant, upload_adapter: Upload
) -> None:
    alice, bob = new_tenant("alice"), new_tenant("bob")
    upload_adapter(alice, "open", "prompt", visibility="public")
    upload_adapter(alice, "secret", "prompt")
    assert export(client, bob, "alice/open") == export(client, alice, "alice/open")

    foreign = client.get("/v1/prefixes/alice/secret/adapter", headers=bob.headers)
    missing = client.get("/v1/prefixes/alice/nothing/adapter", headers=bob.headers)
    # Existence is not disclosed: the same answer as for a name that does not exist.
    assert_error(foreign, 404, "alice/secret", "not found")
    assert_error(missing, 404, "alice/nothing", "not found")
    assert foreign.json()["error"]["type"] == missing.json()["error"]["type"]
    assert served_tokens(client, alice, "alice/secret")  # the owner is unaffected


def test_a_version_on_request_is_the_live_one_or_a_404_naming_it(
    client: TestClient, tenant: TenantAuth, upload_adapter: Upload
) -> None:
    upload_adapter(tenant, "mine", "prompt")
    upload_adapter(tenant, "mine", "prefix", overwrite="true")
    current = export(client, tenant, "alice/mine", version=2)
    assert current == export(client, tenant, "alice/mine")
    assert b"PREFIX_TUNING" in current[CONFIG]

    old = client.get("/v1/prefixes/alice/mine/adapter?version=1", headers=tenant.headers)
    assert_error(old, 404, "version 1", "current version is 2")
    for bad in ("0", "two"):
        response = client.get(
            f"/v1/prefixes/alice/mine/adapter?version={bad}", headers=tenant.headers
        )
        assert_error(response, 422, "version")


def test_a_prefix_stored_before_its_parameters_were_kept_exports_its_compiled_kv(
    client: TestClient,
    tenant: TenantAuth,
    upload_adapter: Upload,
    loaded: LoadedModel,
    tmp_path: Path,
) -> None:
    """What an upgraded registry's older prefixes give: prefix tuning's keys and values, which
    serve exactly what the prefix served (docs/registry.md)."""
    from sqlalchemy import update

    from prefixes.storage.database import write_transaction
    from prefixes.storage.schema import prefixes

    upload_adapter(tenant, "old", "p_tuning")
    registry = client.app.state.services.registry  # type: ignore[attr-defined]
    with write_transaction(registry.database) as connection:  # as migration 5 leaves it
        connection.execute(update(prefixes).values(parameters_sha256=None))

    files = export(client, tenant, "alice/old")
    assert b"PREFIX_TUNING" in files[CONFIG]
    exported = peft_tokens(loaded, unpack(files, tmp_path / "export"))
    assert exported == served_tokens(client, tenant, "alice/old")


@pytest.mark.parametrize("method", ["prefix_tuning", "prompt_tuning"])
def test_a_fine_tuned_prefix_exports_like_an_uploaded_one(
    make_client: MakeClient, loaded: LoadedModel, tmp_path: Path, method: str
) -> None:
    model = worded(loaded)
    with make_client(model=model) as client:
        alice = create_tenant(client, "alice")
        few_steps = {"n_epochs": 2, "batch_size": 3}
        job = start_job(
            client, alice, suffix="tuned", hyperparameters=few_steps, method={"type": method}
        )
        assert wait_status(client, alice, job["id"])["status"] == "succeeded"
        tuned = client.get("/v1/prefixes/alice/tuned", headers=alice.headers).json()

        files = export(client, alice, "alice/tuned")
        exported = peft_tokens(model, unpack(files, tmp_path / "export"))
        assert exported == served_tokens(client, alice, "alice/tuned")
        again = reupload(client, alice, files, "again")
        assert (again["kind"], again["sha256"]) == (method, tuned["sha256"])


def test_prefix_server_download_writes_the_folder_peft_loads(
    client: TestClient,
    new_tenant: NewTenant,
    upload_adapter: Upload,
    loaded: LoadedModel,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    import httpx

    from server.cli import main

    alice, bob = new_tenant("alice"), new_tenant("bob")
    upload_adapter(alice, "mine", "p_tuning")

    def get(url: str, **options: Any) -> Any:  # the CLI's request, answered by the app
        return client.get(url.removeprefix("http://server"), **options)

    monkeypatch.setattr(httpx, "get", get)

    def download(who: TenantAuth, out: Path) -> int:
        argv = ["download", "alice/mine", "--out", str(out), "--url", "http://server"]
        return main([*argv, "--api-key", who.api_key])

    assert download(alice, tmp_path / "mine") == 0
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == [CONFIG, WEIGHTS]
    exported = peft_tokens(loaded, tmp_path / "mine")
    assert exported == served_tokens(client, alice, "alice/mine")
    assert download(bob, tmp_path / "theirs") == 1  # private: 404, nothing written
    assert not (tmp_path / "theirs").exists()
