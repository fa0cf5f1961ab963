"""The catalog on its own: it opens without a model (the offline `tenant create`), shares the
database with a registry that has one, and, knowing no model, calls no prefix servable."""

from __future__ import annotations

from pathlib import Path

import pytest

from prefixes.catalog.catalog import Catalog
from prefixes.errors import Incompatible
from server.cli import main
from tests.registry_support import native_files, open_registry
from tests.tiny import tiny_loaded


def test_offline_tenant_create_gives_a_key_the_server_accepts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    command = ["tenant", "create", "dave", "--data-dir", str(tmp_path)]
    assert main(command) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("tenant: dave\napi_key: psk_")
    api_key = printed.split("api_key: ")[1].strip()
    assert main(command) == 1
    assert "already exists" in capsys.readouterr().err

    with open_registry(tmp_path, tiny_loaded("llama")) as registry:
        assert registry.authenticate(api_key) == "dave"


def test_a_catalog_without_a_model_reads_metadata_but_resolves_nothing(tmp_path: Path) -> None:
    loaded = tiny_loaded("llama")
    with open_registry(tmp_path, loaded) as registry:
        registry.create_tenant("alice")
        uploaded = registry.upload("alice", "pirate", native_files(loaded.spec, 4, seed=1))

    with Catalog(tmp_path) as catalog:
        info = catalog.get("pirate", tenant="alice")
        assert (info.sha256, info.version, info.compatible) == (uploaded.sha256, 1, False)
        assert [p.id for p in catalog.list_prefixes(tenant="alice").items] == ["alice/pirate"]
        with pytest.raises(Incompatible):
            catalog.resolve("pirate", tenant="alice")
