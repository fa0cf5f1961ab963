"""Migration 5 on a registry that version 4 of the code wrote: every prefix stays, serves the
same KV, and exports its compiled form as prefix tuning's keys and values (its parameters were
never kept); a new upload keeps its parameters beside its compiled KV."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from sqlalchemy import insert, inspect

from prefixes import ModelSpec, PrefixKind, read_peft, read_upload
from prefixes.formats.compile import PrefixCompiler, compile_prefix
from prefixes.storage.database import open_engine, sqlite_url, write_transaction
from prefixes.storage.kvfile import encode_compiled
from prefixes.storage.schema import MIGRATIONS, prefixes, schema_version, tenants
from prefixes.storage.store import BlobStore
from tests.registry_support import blob_files, files_of, native_files

SPEC = ModelSpec(
    num_layers=2, hidden_size=32, num_kv_heads=2, head_dim=8, vocab_size=64,
    max_positions=128, dtype="float32", weights_digest="upgrade-test",
)  # fmt: skip


def no_soft_prompts(embeddings: torch.Tensor) -> torch.Tensor:
    raise AssertionError("only prefix-tuning uploads in this test")


def version_4_registry(data_dir: Path) -> tuple[str, torch.Tensor]:
    """What version 4's upload left: a compiled file and a row naming only it."""
    kv = read_upload(native_files(SPEC, 3, seed=7)).tensor
    compiled = compile_prefix(
        read_upload(native_files(SPEC, 3, seed=7)), no_soft_prompts, dtype=torch.float32
    )
    store = BlobStore(data_dir)
    staged = store.stage(encode_compiled(compiled, SPEC.fingerprint()))
    store.publish(staged)
    store.close()
    engine = open_engine(sqlite_url(data_dir))
    with write_transaction(engine) as connection:
        schema_version.create(connection)
        connection.execute(insert(schema_version).values(version=4))
        for migration in MIGRATIONS[:4]:
            migration(connection)
        connection.execute(insert(tenants).values(name="alice", created_at=0.0))
        connection.execute(
            insert(prefixes).values(
                owner="alice", name="old", version=1, kind="prefix_tuning",
                num_virtual_tokens=3, bytes=staged.size, sha256=staged.sha256,
                model_fingerprint=SPEC.fingerprint(), visibility="private", description="",
                created_at=time.time(),
            )
        )  # fmt: skip
    assert "parameters_sha256" not in {c["name"] for c in inspect(engine).get_columns("prefixes")}
    engine.dispose()
    return staged.sha256, kv


def test_an_upgrade_keeps_every_prefix_and_exports_old_ones_as_their_compiled_kv(
    tmp_path: Path,
) -> None:
    from prefixes.registry import Registry

    sha256, kv = version_4_registry(tmp_path)
    compiler = PrefixCompiler(SPEC, no_soft_prompts, 16)
    with Registry(tmp_path, compiler=compiler) as registry:
        old = registry.get("old", tenant="alice")
        assert (old.sha256, old.parameters_sha256) == (sha256, None)
        assert blob_files(tmp_path) == {sha256}  # the opening sweep kept it
        with registry.acquire("old", tenant="alice") as handle:
            assert torch.equal(handle.prefix.kv, kv)

        _, files = registry.export("old", tenant="alice")
        exported = read_peft(files["adapter_config.json"], files["adapter_model.safetensors"])
        assert exported.kind is PrefixKind.PREFIX_TUNING
        assert torch.equal(exported.tensor, kv)

        new = registry.upload("alice", "new", native_files(SPEC, 3, seed=8))
        assert new.parameters_sha256 is not None
        assert blob_files(tmp_path) == {sha256} | files_of(new)
        assert registry.usage("alice").bytes == old.bytes + new.bytes
