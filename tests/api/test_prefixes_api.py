"""Tenants and prefix endpoints: uploads of every kind, every refusal, listing, deletion."""

from __future__ import annotations

import copy
import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from peft import LoraConfig, get_peft_model
from safetensors.torch import save as save_safetensors
from transformers import AutoModelForCausalLM

from prefixes import PrefixKind, RawPrefix, write_native
from server.models import LoadedModel
from tests.api.conftest import ADMIN, assert_error, auth, make_client, peft_files
from tests.tiny import ADAPTER_KINDS, make_adapter, tiny_config

Tenant = Callable[[], tuple[str, dict[str, str]]]


def listing(client: TestClient, headers: dict[str, str]) -> list[dict]:
    response = client.get("/v1/prefixes", params={"scope": "own"}, headers=headers)
    assert response.status_code == 200
    return list(response.json()["data"])


def upload(client: TestClient, headers: dict[str, str], files: list, **fields: str):  # type: ignore[no-untyped-def]
    return client.post("/v1/prefixes", data=fields, files=files, headers=headers)


# Tenants -----------------------------------------------------------------------------------


def test_admin_creates_a_tenant_once(client: TestClient) -> None:
    created = client.post("/v1/tenants", json={"name": "zoe"}, headers=auth(ADMIN))
    assert created.status_code == 201
    assert created.json()["tenant"] == "zoe" and created.json()["api_key"].startswith("psk_")
    again = client.post("/v1/tenants", json={"name": "zoe"}, headers=auth(ADMIN))
    assert_error(again, 409, "zoe")


@pytest.mark.parametrize("name", ["Zoe", "../x", "", "a" * 65, "a b"])
def test_invalid_tenant_names_are_refused(client: TestClient, name: str) -> None:
    assert_error(client.post("/v1/tenants", json={"name": name}, headers=auth(ADMIN)), 422)


def test_only_the_admin_creates_tenants(client: TestClient, tenant: Tenant) -> None:
    _, headers = tenant()
    assert_error(client.post("/v1/tenants", json={"name": "x1"}), 401, "API key")
    assert_error(client.post("/v1/tenants", json={"name": "x1"}, headers=auth("nope")), 401)
    assert_error(client.post("/v1/tenants", json={"name": "x1"}, headers=headers), 401)


# Uploads -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ADAPTER_KINDS)
def test_every_peft_kind_uploads(
    client: TestClient, tenant: Tenant, adapters: dict[str, Path], kind: str
) -> None:
    owner, headers = tenant()
    response = upload(client, headers, peft_files(adapters[kind]), name="mine", description="hi")
    assert response.status_code == 201, response.text
    body = response.json()
    expected_kind = {"prefix_projection": "prefix", "prompt": "prompt_tuning"}.get(kind, kind)
    assert body["id"] == f"{owner}/mine" and body["version"] == 1
    assert body["kind"] == {"prefix": "prefix_tuning"}.get(expected_kind, expected_kind)
    assert body["num_virtual_tokens"] == 4 + ADAPTER_KINDS.index(kind)
    assert body["visibility"] == "private" and body["description"] == "hi"
    assert len(body["sha256"]) == 64 and body["bytes"] > 0 and body["created_at"]
    assert client.get(f"/v1/prefixes/{owner}/mine", headers=headers).json() == body


def test_native_file_uploads(client: TestClient, tenant: Tenant, loaded: LoadedModel) -> None:
    _, headers = tenant()
    native = write_native(
        RawPrefix(PrefixKind.PROMPT_TUNING, torch.randn(3, loaded.spec.hidden_size))
    )
    response = upload(client, headers, [("files", ("p.safetensors", native))], name="native")
    assert response.status_code == 201, response.text
    assert response.json()["kind"] == "prompt_tuning"


def test_overwrite_makes_a_new_version(
    client: TestClient, tenant: Tenant, adapters: dict[str, Path]
) -> None:
    _, headers = tenant()
    files = peft_files(adapters["prefix"])
    assert upload(client, headers, files, name="v").json()["version"] == 1
    assert_error(upload(client, headers, files, name="v"), 409, "v")
    replaced = upload(client, headers, peft_files(adapters["prompt"]), name="v", overwrite="true")
    assert replaced.status_code == 201 and replaced.json()["version"] == 2
    assert replaced.json()["kind"] == "prompt_tuning"


def _other_geometry_adapter(tmp: Path, **changes: int) -> Path:
    config = tiny_config("llama")
    for key, value in changes.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config)
    make_adapter(model, "prefix", 4, tmp / "other", seed=0)
    return tmp / "other"


def _files_with(folder: Path, **replace: bytes) -> list:
    files = dict(f[1] for f in peft_files(folder))
    files.update(replace)
    return [("files", (name, data)) for name, data in files.items()]


def _config(folder: Path, **changes: object) -> bytes:
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    return json.dumps(config).encode()


def _nan_weights(folder: Path) -> bytes:
    from safetensors.torch import load

    tensors = load((folder / "adapter_model.safetensors").read_bytes())
    tensors["prompt_embeddings"][0, 0] = float("nan")
    return save_safetensors(tensors)


def _lora(tmp: Path, loaded: LoadedModel) -> Path:
    lora = get_peft_model(copy.deepcopy(loaded.model), LoraConfig(target_modules=["q_proj"]))
    lora.save_pretrained(tmp / "lora")
    return tmp / "lora"


WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


def _soft_prompt_of_width(width: int) -> list:
    native = write_native(RawPrefix(PrefixKind.PROMPT_TUNING, torch.randn(3, width)))
    return [("files", ("x.safetensors", native))]


def _config_only(folder: Path, weights: tuple[str, bytes] | None = None) -> list:
    files = [("files", (CONFIG, (folder / CONFIG).read_bytes()))]
    return files + ([("files", weights)] if weights else [])


BAD_UPLOADS = {
    "malformed safetensors": (
        lambda a, t, m: _files_with(a, **{WEIGHTS: b"\x08\0\0\0\0\0\0\0{garbage"}),
        "safetensors",
    ),
    "enormous header length": (
        lambda a, t, m: _files_with(a, **{WEIGHTS: struct.pack("<Q", 2**60) + b"{}"}),
        "header",
    ),
    "invalid JSON config": (lambda a, t, m: _files_with(a, **{CONFIG: b"{not json"}), "JSON"),
    "LoRA adapter": (lambda a, t, m: peft_files(_lora(t, m)), "LORA"),
    "other number of layers": (
        lambda a, t, m: peft_files(_other_geometry_adapter(t, num_hidden_layers=5)),
        "num_layers",
    ),
    "other head_dim": (
        lambda a, t, m: peft_files(_other_geometry_adapter(t, head_dim=16)),
        "head_dim",
    ),
    "other hidden size": (lambda a, t, m: _soft_prompt_of_width(32), "hidden_size"),
    "NaN values": (lambda a, t, m: _files_with(a, **{WEIGHTS: _nan_weights(a)}), "NaN"),
    "pickle .bin": (
        lambda a, t, m: _config_only(a, ("adapter_model.bin", b"\x80\x04K\x01.")),
        "safetensors",
    ),
    "missing weights": (lambda a, t, m: _config_only(a), WEIGHTS),
    "wrong task type": (
        lambda a, t, m: _files_with(a, **{CONFIG: _config(a, task_type="SEQ_2_SEQ_LM")}),
        "task_type",
    ),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_uploads_are_refused_and_change_nothing(
    client: TestClient, tenant: Tenant, adapters: dict[str, Path], loaded: LoadedModel,
    tmp_path: Path, case: str,
) -> None:  # fmt: skip
    make_files, word = BAD_UPLOADS[case]
    _, headers = tenant()
    assert upload(client, headers, peft_files(adapters["prefix"]), name="keep").status_code == 201
    before = listing(client, headers)
    response = upload(client, headers, make_files(adapters["prefix"], tmp_path, loaded), name="bad")
    assert_error(response, 422, word)
    assert listing(client, headers) == before
    assert client.get("/health").status_code == 200  # still serving


@pytest.mark.parametrize("name", ["../x", "UPPER", "", "a" * 65, "a/b", ".hidden"])
def test_invalid_prefix_names(
    client: TestClient, tenant: Tenant, adapters: dict[str, Path], name: str
) -> None:
    _, headers = tenant()
    response = upload(client, headers, peft_files(adapters["prefix"]), name=name)
    assert_error(response, 422)
    assert listing(client, headers) == []


def test_path_components_in_file_names_are_ignored(
    client: TestClient, tenant: Tenant, adapters: dict[str, Path], tmp_path: Path
) -> None:
    _, headers = tenant()
    files = [
        ("files", (f"../../etc/{name}", data)) for _, (name, data) in peft_files(adapters["prefix"])
    ]
    response = upload(client, headers, files, name="traversal")
    assert response.status_code == 201  # only the base names count; nothing is written by name
    assert not Path("/etc/adapter_config.json").exists()


def test_oversize_upload_is_413_before_reading_it_all(
    loaded: LoadedModel, adapters: dict[str, Path], tmp_path: Path
) -> None:
    with make_client(loaded, tmp_path, max_upload_bytes=2048) as small:
        created = small.post("/v1/tenants", json={"name": "big"}, headers=auth(ADMIN)).json()
        headers = auth(created["api_key"])
        files = [("files", ("x.safetensors", b"\0" * 10_000))]
        assert_error(
            small.post("/v1/prefixes", data={"name": "x"}, files=files, headers=headers),
            413,
            "2048",
        )
        assert listing(small, headers) == []


def test_form_problems(client: TestClient, tenant: Tenant, adapters: dict[str, Path]) -> None:
    _, headers = tenant()
    assert_error(client.post("/v1/prefixes", json={"name": "x"}, headers=headers), 415, "multipart")
    assert_error(upload(client, headers, peft_files(adapters["prefix"])), 422, "name")
    no_files = client.post(
        "/v1/prefixes", data={"name": "x"}, files=[("other", ("a", b"1"))], headers=headers
    )
    assert_error(no_files, 422)
    bad_flag = upload(client, headers, peft_files(adapters["prefix"]), name="x", overwrite="maybe")
    assert_error(bad_flag, 422, "overwrite")
    bad_visibility = upload(
        client, headers, peft_files(adapters["prefix"]), name="x", visibility="secret"
    )
    assert_error(bad_visibility, 422, "visibility")


# Listing, get, delete ----------------------------------------------------------------------


def test_listing_pages_and_scopes(
    client: TestClient, tenant: Tenant, adapters: dict[str, Path]
) -> None:
    owner, headers = tenant()
    for i in range(5):
        visibility = "public" if i % 2 else "private"
        assert (
            upload(
                client, headers, peft_files(adapters["prefix"]), name=f"p{i}", visibility=visibility
            ).status_code
            == 201
        )
    ids, cursor = [], None
    while True:
        params = {"scope": "own", "limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/prefixes", params=params, headers=headers).json()
        assert len(page["data"]) <= 2
        ids += [p["id"] for p in page["data"]]
        cursor = page["next"]
        if cursor is None:
            break
    assert ids == [f"{owner}/p{i}" for i in range(5)]
    public = client.get(
        "/v1/prefixes", params={"scope": "public", "limit": 1000}, headers=headers
    ).json()
    assert {f"{owner}/p1", f"{owner}/p3"} <= {p["id"] for p in public["data"]}
    assert f"{owner}/p0" not in {p["id"] for p in public["data"]}
    assert_error(
        client.get("/v1/prefixes", params={"scope": "mine"}, headers=headers), 422, "scope"
    )
    assert_error(client.get("/v1/prefixes", params={"limit": 0}, headers=headers), 422, "limit")


def test_delete_hides_at_once(
    client: TestClient, tenant: Tenant, adapters: dict[str, Path]
) -> None:
    owner, headers = tenant()
    upload(client, headers, peft_files(adapters["prefix"]), name="gone")
    assert client.delete(f"/v1/prefixes/{owner}/gone", headers=headers).status_code == 204
    assert_error(client.get(f"/v1/prefixes/{owner}/gone", headers=headers), 404)
    assert_error(client.delete(f"/v1/prefixes/{owner}/gone", headers=headers), 404)
    body = {"prompt": [1, 2], "prefix": "gone", "max_new_tokens": 2}
    assert_error(client.post("/v1/generate", json=body, headers=headers), 404)
