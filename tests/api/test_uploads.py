"""POST /v1/prefixes: every PEFT kind and the native file are accepted; every refusal names the
problem and leaves the registry exactly as it was (listing and files on disk)."""

from __future__ import annotations

import copy
import json
import pickle
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from peft import LoraConfig, get_peft_model
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from transformers import AutoModelForCausalLM

from prefixes import PrefixKind, RawPrefix, write_native
from server.models import LoadedModel
from tests.api.conftest import (
    API_KIND,
    CONFIG,
    NUM_VIRTUAL_TOKENS,
    WEIGHTS,
    Files,
    MakeClient,
    TenantAuth,
    Upload,
    assert_error,
    create_tenant,
    peft_files,
    registry_state,
    upload,
)
from tests.tiny import ADAPTER_KINDS, make_adapter, tiny_config

# Accepted uploads ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ADAPTER_KINDS)
def test_every_peft_kind_is_accepted(
    client: TestClient, tenant: TenantAuth, adapters: dict[str, Path], kind: str
) -> None:
    files = peft_files(adapters[kind])
    response = upload(client, tenant, files, name="style", description="pirate talk")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["id"] == "alice/style" and body["owner"] == "alice" and body["name"] == "style"
    assert body["version"] == 1
    assert body["kind"] == API_KIND[kind]
    assert body["num_virtual_tokens"] == NUM_VIRTUAL_TOKENS[kind]
    assert isinstance(body["bytes"], int) and body["bytes"] > 0
    assert len(body["sha256"]) == 64 and int(body["sha256"], 16) >= 0
    assert body["visibility"] == "private"
    assert body["description"] == "pirate talk"
    assert datetime.fromisoformat(body["created_at"]).tzinfo is not None
    assert client.get("/v1/prefixes/alice/style", headers=tenant.headers).json() == body


@pytest.mark.parametrize("visibility", ["public", "private"])
def test_visibility_is_recorded(
    client: TestClient, tenant: TenantAuth, adapters: dict[str, Path], visibility: str
) -> None:
    response = upload(
        client, tenant, peft_files(adapters["prefix"]), name="v", visibility=visibility
    )
    assert response.status_code == 201, response.text
    assert response.json()["visibility"] == visibility


@pytest.mark.parametrize("kind", [PrefixKind.PROMPT_TUNING, PrefixKind.PREFIX_TUNING])
def test_a_native_safetensors_file_is_accepted(
    client: TestClient, tenant: TenantAuth, loaded: LoadedModel, kind: PrefixKind
) -> None:
    spec = loaded.spec
    shape = (
        (3, spec.hidden_size)
        if kind.is_soft_prompt
        else (spec.num_layers, 2, spec.num_kv_heads, 3, spec.head_dim)
    )
    native = write_native(RawPrefix(kind, torch.randn(shape)))
    response = upload(client, tenant, [("files", ("mine.safetensors", native))], name="native")
    assert response.status_code == 201, response.text
    assert response.json()["kind"] == kind.value
    assert response.json()["num_virtual_tokens"] == 3


def test_overwrite_false_on_an_existing_name_is_409_and_true_makes_version_2(
    client: TestClient, tenant: TenantAuth, adapters: dict[str, Path], upload_adapter: Upload
) -> None:
    first = upload_adapter(tenant, "v", "prefix")
    before = registry_state(client, tenant)
    for overwrite in ({}, {"overwrite": "false"}):
        again = upload(client, tenant, peft_files(adapters["prompt"]), name="v", **overwrite)
        assert_error(again, 409, "alice/v", "exists", "overwrite")
        assert registry_state(client, tenant) == before

    second = upload(client, tenant, peft_files(adapters["prompt"]), name="v", overwrite="true")
    assert second.status_code == 201, second.text
    assert second.json()["version"] == 2 and second.json()["kind"] == "prompt_tuning"
    assert second.json()["sha256"] != first["sha256"]
    current = client.get("/v1/prefixes/alice/v", headers=tenant.headers).json()
    assert current == second.json()
    listed = client.get("/v1/prefixes", headers=tenant.headers).json()["data"]
    assert [(p["id"], p["version"]) for p in listed] == [("alice/v", 2)]


# Refused uploads ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Sources:
    """What the bad uploads are made from."""

    adapters: dict[str, Path]
    other: dict[str, Path]  # adapters trained for other geometries
    lora: Path
    loaded: LoadedModel
    tmp: Path


@pytest.fixture(scope="module")
def other_geometry(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real PEFT adapters made on tiny llamas that differ from the served one in one dimension."""
    root = tmp_path_factory.mktemp("other-geometry")
    variants: dict[str, tuple[str, dict[str, int]]] = {
        "layers": ("prefix", {"num_hidden_layers": 5}),
        "kv_heads": ("prefix", {"num_key_value_heads": 4}),
        "head_dim": ("prefix", {"head_dim": 16}),
        "hidden_size": ("prompt", {"hidden_size": 32}),
    }
    made = {}
    for name, (kind, changes) in variants.items():
        config = tiny_config("llama")
        for key, value in changes.items():
            setattr(config, key, value)
        torch.manual_seed(0)
        make_adapter(AutoModelForCausalLM.from_config(config), kind, 4, root / name, seed=0)
        made[name] = root / name
    return made


@pytest.fixture(scope="module")
def lora_adapter(loaded: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("lora")
    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    get_peft_model(copy.deepcopy(loaded.model), config).save_pretrained(str(folder))
    assert (folder / CONFIG).exists() and (folder / WEIGHTS).exists()
    return folder


@pytest.fixture
def sources(
    adapters: dict[str, Path],
    other_geometry: dict[str, Path],
    lora_adapter: Path,
    loaded: LoadedModel,
    tmp_path: Path,
) -> Sources:
    return Sources(adapters, other_geometry, lora_adapter, loaded, tmp_path)


def replaced(folder: Path, **files: bytes | None) -> Files:
    """The adapter's two files with some replaced (bytes) or left out (None); keyword names
    spell the dot as `__`."""
    named: dict[str, bytes | None] = {
        name: (folder / name).read_bytes() for name in (CONFIG, WEIGHTS)
    }
    named.update({name.replace("__", "."): data for name, data in files.items()})
    return [("files", (name, data)) for name, data in named.items() if data is not None]


def config_with(folder: Path, **changes: Any) -> bytes:
    config = json.loads((folder / CONFIG).read_text())
    config.update(changes)
    return json.dumps(config).encode()


def weights_with(folder: Path, value: float) -> bytes:
    tensors = load_safetensors((folder / WEIGHTS).read_bytes())
    tensors["prompt_embeddings"][1, 2] = value
    return save_safetensors(tensors)


def native(
    tensor: torch.Tensor,
    kind: PrefixKind = PrefixKind.PROMPT_TUNING,
    name: str = "prefix.safetensors",
) -> Files:
    return [("files", (name, write_native(RawPrefix(kind, tensor))))]


class Evil:
    """Unpickling this creates a file: proof that an upload was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def pickled(s: Sources, name: str) -> Files:
    payload = pickle.dumps(Evil(s.tmp / "unpickled"))
    return [
        ("files", (CONFIG, (s.adapters["prompt"] / CONFIG).read_bytes())),
        ("files", (name, payload)),
    ]


P, Q = "prefix", "prompt"
# case -> (files, the words the message must contain)
BAD_FILES: dict[str, tuple[Callable[[Sources], Files], tuple[str, ...]]] = {
    "malformed safetensors": (
        lambda s: replaced(s.adapters[P], adapter_model__safetensors=b"\x08\0\0\0\0\0\0\0{garbage"),
        ("malformed safetensors",),
    ),
    "truncated safetensors": (
        lambda s: replaced(
            s.adapters[P], adapter_model__safetensors=(s.adapters[P] / WEIGHTS).read_bytes()[:-10]
        ),
        (WEIGHTS,),
    ),
    "safetensors header claiming an enormous length": (
        lambda s: replaced(
            s.adapters[P], adapter_model__safetensors=struct.pack("<Q", 2**62) + b"{}"
        ),
        ("header", str(2**62)),
    ),
    "empty weights file": (
        lambda s: replaced(s.adapters[P], adapter_model__safetensors=b""),
        ("not a safetensors file",),
    ),
    "invalid JSON config": (
        lambda s: replaced(s.adapters[P], adapter_config__json=b"{not json"),
        (CONFIG, "JSON"),
    ),
    "config not an object": (
        lambda s: replaced(s.adapters[P], adapter_config__json=b"[1, 2]"),
        (CONFIG, "object"),
    ),
    "LoRA adapter": (lambda s: peft_files(s.lora), ("peft_type", "LORA")),
    "wrong number of layers": (lambda s: peft_files(s.other["layers"]), ("num_layers",)),
    "wrong number of kv heads": (lambda s: peft_files(s.other["kv_heads"]), ("kv_heads",)),
    "wrong head_dim": (lambda s: peft_files(s.other["head_dim"]), ("head_dim",)),
    "wrong hidden size": (lambda s: peft_files(s.other["hidden_size"]), ("hidden_size", "64")),
    "rows differ from num_virtual_tokens": (
        lambda s: replaced(
            s.adapters[Q], adapter_config__json=config_with(s.adapters[Q], num_virtual_tokens=9)
        ),
        ("num_virtual_tokens", "9"),
    ),
    "wrong task type": (
        lambda s: replaced(
            s.adapters[Q], adapter_config__json=config_with(s.adapters[Q], task_type="SEQ_2_SEQ_LM")
        ),
        ("task_type", "SEQ_2_SEQ_LM"),
    ),
    "NaN values": (
        lambda s: replaced(
            s.adapters[Q], adapter_model__safetensors=weights_with(s.adapters[Q], float("nan"))
        ),
        ("NaN",),
    ),
    "Inf values": (
        lambda s: replaced(
            s.adapters[P], adapter_model__safetensors=weights_with(s.adapters[P], float("inf"))
        ),
        ("Inf",),
    ),
    "too many virtual tokens": (
        lambda s: native(torch.zeros(300, s.loaded.spec.hidden_size)),
        ("num_virtual_tokens", "300"),
    ),
    "zero virtual tokens": (
        lambda s: native(torch.zeros(0, s.loaded.spec.hidden_size)),
        ("num_virtual_tokens",),
    ),
    "integer tensor": (
        lambda s: [
            (
                "files",
                (
                    "p.safetensors",
                    save_safetensors(
                        {"soft_prompt": torch.zeros(2, 64, dtype=torch.int32)},
                        metadata={
                            "format": "prefix-server",
                            "format_version": "1",
                            "kind": "prompt_tuning",
                        },
                    ),
                ),
            )
        ],
        ("floating-point",),
    ),
    "plain safetensors without native metadata": (
        lambda s: [("files", ("p.safetensors", save_safetensors({"x": torch.zeros(2, 64)})))],
        ("format",),
    ),
    "pickle adapter_model.bin": (
        lambda s: pickled(s, "adapter_model.bin"),
        ("pickle", "safetensors"),
    ),
    "pickle .pt beside valid files": (
        lambda s: [
            *peft_files(s.adapters[P]),
            ("files", ("extra.pt", pickle.dumps(Evil(s.tmp / "unpickled")))),
        ],
        ("extra.pt", "safetensors"),
    ),
    "missing weights file": (
        lambda s: replaced(s.adapters[P], adapter_model__safetensors=None),
        (WEIGHTS,),
    ),
    "missing config file": (
        lambda s: replaced(s.adapters[P], adapter_config__json=None),
        (CONFIG, "format"),
    ),
    "two native files": (
        lambda s: [*native(torch.zeros(2, 64)), *native(torch.ones(2, 64), name="b.safetensors")],
        ("files",),
    ),
    "the same file name twice": (
        lambda s: [
            *peft_files(s.adapters[P]),
            ("files", (CONFIG, (s.adapters[P] / CONFIG).read_bytes())),
        ],
        (CONFIG, "twice"),
    ),
    "an unknown file": (
        lambda s: [("files", ("notes.txt", b"hello"))],
        ("notes.txt",),
    ),
}


@pytest.fixture
def kept(client: TestClient, tenant: TenantAuth, upload_adapter: Upload) -> Iterator[dict]:
    """A prefix `keep` the tenant already has: refused uploads must leave it as it is."""
    info = upload_adapter(tenant, "keep", "prefix")
    before = registry_state(client, tenant)
    yield info
    assert registry_state(client, tenant) == before, "a refused upload changed the registry"
    assert client.get("/v1/prefixes/alice/keep", headers=tenant.headers).json() == info


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_are_422_and_change_nothing(
    client: TestClient, tenant: TenantAuth, sources: Sources, kept: dict, case: str
) -> None:
    make_files, words = BAD_FILES[case]
    files = make_files(sources)
    fresh = upload(client, tenant, files, name="fresh")
    error = assert_error(fresh, 422, *words)
    # The same files replacing an existing prefix: still refused, and `keep` stays version 1.
    replacing = upload(client, tenant, files, name="keep", overwrite="true")
    assert assert_error(replacing, 422) == error
    assert not (sources.tmp / "unpickled").exists(), "an uploaded pickle was unpickled"


BAD_FIELDS: dict[str, tuple[dict[str, str], tuple[str, ...]]] = {
    "description too long": ({"description": "x" * 1025}, ("description", "1024")),
    "unknown visibility": ({"visibility": "secret"}, ("visibility", "secret")),
    "overwrite not a boolean": ({"overwrite": "maybe"}, ("overwrite", "maybe")),
    "an unknown field": ({"colour": "red"}, ("colour",)),
}


@pytest.mark.parametrize("case", list(BAD_FIELDS))
def test_bad_form_fields_are_422_and_change_nothing(
    client: TestClient, tenant: TenantAuth, adapters: dict[str, Path], kept: dict, case: str
) -> None:
    fields, words = BAD_FIELDS[case]
    files = peft_files(adapters["prompt"])
    assert_error(upload(client, tenant, files, name="fresh", **fields), 422, *words)
    replacing = upload(client, tenant, files, **{"name": "keep", "overwrite": "true", **fields})
    assert_error(replacing, 422, *words)


@pytest.mark.parametrize(
    "name", ["../x", "UPPER", "", "a" * 65, "a/b", ".hidden", "-x", "a b", "é", "x\\y"]
)
def test_invalid_prefix_names_are_422_and_change_nothing(
    client: TestClient, tenant: TenantAuth, adapters: dict[str, Path], kept: dict, name: str
) -> None:
    response = upload(client, tenant, peft_files(adapters["prompt"]), name=name)
    error = assert_error(response, 422, "name")
    assert "a-z0-9" in error["message"]


TRAVERSAL_NAMES = [
    ("../../etc/" + CONFIG, "../../etc/" + WEIGHTS),
    ("/etc/" + CONFIG, "/etc/" + WEIGHTS),
    ("..\\..\\" + CONFIG, "..\\..\\" + WEIGHTS),
]


@pytest.mark.parametrize("names", TRAVERSAL_NAMES, ids=["dotdot", "absolute", "backslash"])
def test_path_traversal_file_names_never_escape_the_data_dir(
    client: TestClient,
    tenant: TenantAuth,
    adapters: dict[str, Path],
    tmp_path: Path,
    names: tuple[str, str],
) -> None:
    """Whatever the status, nothing is written where a file name points."""
    before = {p for p in tmp_path.parent.rglob("*")}
    response = upload(client, tenant, peft_files(adapters["prompt"], names=names), name="t")
    assert response.status_code in (201, 422), response.text
    assert not Path("/etc/" + CONFIG).exists() and not Path("/etc/" + WEIGHTS).exists()
    data_dir = tmp_path / "data0"
    escaped = {p for p in tmp_path.parent.rglob("*")} - before
    assert all(data_dir in p.parents for p in escaped), sorted(escaped)
    assert not any(p.name in (CONFIG, WEIGHTS) for p in escaped)


@pytest.mark.parametrize("names", TRAVERSAL_NAMES, ids=["dotdot", "absolute", "backslash"])
def test_path_traversal_file_names_are_422(
    client: TestClient, tenant: TenantAuth, adapters: dict[str, Path], names: tuple[str, str]
) -> None:
    before = registry_state(client, tenant)
    response = upload(client, tenant, peft_files(adapters["prompt"], names=names), name="t")
    assert_error(response, 422, "files")
    assert registry_state(client, tenant) == before


def test_a_file_without_a_name_is_422_saying_so(
    client: TestClient, tenant: TenantAuth, adapters: dict[str, Path]
) -> None:
    before = registry_state(client, tenant)
    files = peft_files(adapters["prompt"], names=(CONFIG, ""))
    error = assert_error(upload(client, tenant, files, name="fresh"), 422, "file name")
    assert "unknown" not in error["message"]
    assert registry_state(client, tenant) == before


# Form problems, media type and size ---------------------------------------------------------


def test_a_non_multipart_body_is_415(client: TestClient, tenant: TenantAuth, kept: dict) -> None:
    as_json = client.post("/v1/prefixes", json={"name": "x"}, headers=tenant.headers)
    assert_error(as_json, 415, "multipart/form-data")
    as_text = client.post(
        "/v1/prefixes", content=b"name=x", headers={**tenant.headers, "content-type": "text/plain"}
    )
    assert_error(as_text, 415, "multipart/form-data")
    assert_error(client.post("/v1/prefixes", headers=tenant.headers), 415, "multipart/form-data")


def test_missing_name_or_files_are_422(
    client: TestClient, tenant: TenantAuth, adapters: dict[str, Path], kept: dict
) -> None:
    files = peft_files(adapters["prompt"])
    assert_error(upload(client, tenant, files), 422, "name", "required")
    assert_error(upload(client, tenant, files, description="no name"), 422, "name")
    no_files = client.post("/v1/prefixes", data={"name": "x"}, files={}, headers=tenant.headers)
    assert no_files.status_code in (415, 422)  # an empty form may be sent url-encoded
    only_fields = client.post(
        "/v1/prefixes",
        files=[("name", (None, b"x")), ("visibility", (None, b"public"))],
        headers=tenant.headers,
    )
    assert_error(only_fields, 422, "files")
    wrong_field = client.post(
        "/v1/prefixes",
        data={"name": "x"},
        files=[("file", (CONFIG, b"{}"))],
        headers=tenant.headers,
    )
    assert_error(wrong_field, 422, "files")


def test_a_malformed_multipart_body_is_a_client_error(
    client: TestClient, tenant: TenantAuth, kept: dict
) -> None:
    no_boundary = client.post(
        "/v1/prefixes",
        content=b"--x\r\n",
        headers={**tenant.headers, "content-type": "multipart/form-data"},
    )
    assert_error(no_boundary, 400, "multipart")
    too_many = [("files", (f"f{i}.safetensors", b"x")) for i in range(20)]
    assert_error(upload(client, tenant, too_many, name="x"), 400, "files")


@pytest.fixture
def small_limit(make_client: MakeClient) -> Iterator[tuple[TestClient, TenantAuth]]:
    with make_client(max_upload_bytes=2048) as small:
        yield small, create_tenant(small, "alice")


def test_an_upload_over_the_size_limit_is_413(
    small_limit: tuple[TestClient, TenantAuth], adapters: dict[str, Path]
) -> None:
    client, tenant = small_limit
    before = registry_state(client, tenant)
    big = [("files", ("prefix.safetensors", b"\0" * 10_000))]
    assert_error(upload(client, tenant, big, name="big"), 413, "2048")
    assert registry_state(client, tenant) == before


def test_an_upload_over_the_size_limit_without_content_length_is_413(
    small_limit: tuple[TestClient, TenantAuth],
) -> None:
    """Sent chunked, so only reading the stream can find out; it stops at the limit."""
    client, tenant = small_limit
    before = registry_state(client, tenant)

    def body() -> Iterator[bytes]:
        yield b'--b\r\nContent-Disposition: form-data; name="name"\r\n\r\nbig\r\n'
        yield b'--b\r\nContent-Disposition: form-data; name="files"; filename="p.safetensors"'
        yield b"\r\n\r\n"
        for _ in range(64):
            yield b"\0" * 1024
        yield b"\r\n--b--\r\n"

    response = client.post(
        "/v1/prefixes",
        content=body(),
        headers={**tenant.headers, "content-type": "multipart/form-data; boundary=b"},
    )
    assert_error(response, 413, "2048")
    assert registry_state(client, tenant) == before


def test_a_real_adapter_within_the_limit_is_accepted(
    small_limit: tuple[TestClient, TenantAuth], loaded: LoadedModel
) -> None:
    client, tenant = small_limit
    files = native(torch.randn(2, loaded.spec.hidden_size))  # about 600 bytes
    assert upload(client, tenant, files, name="small").status_code == 201
