"""`prefix-server tenant show|quotas|keys|issue-key|revoke-key`: tenant administration offline,
on the database the server uses; no model is loaded."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pytest

from prefixes.catalog.catalog import Catalog
from prefixes.catalog.records import DEFAULT_QUOTAS
from prefixes.errors import QuotaExceeded, Unauthorized
from server.cli import main
from tests.registry_support import native_files, open_registry
from tests.tiny import tiny_loaded


class Printed(NamedTuple):
    out: str
    err: str


def run(capsys: pytest.CaptureFixture[str], *argv: str, data_dir: Path, status: int = 0) -> Printed:
    """What the command printed, its exit status checked."""
    assert main(["tenant", *argv, "--data-dir", str(data_dir)]) == status
    return Printed(*capsys.readouterr())


def fields(printed: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in printed.splitlines())


def key_rows(printed: str) -> list[list[str]]:
    header, *rows = (line.split() for line in printed.splitlines())
    assert header == ["key_id", "created_at", "state"]
    return rows


def test_rotation_offline_revokes_the_old_key_and_keeps_the_new(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = fields(run(capsys, "create", "alice", data_dir=tmp_path).out)["api_key"]
    issued = fields(run(capsys, "issue-key", "alice", data_dir=tmp_path).out)
    assert set(issued) == {"tenant", "key_id", "api_key"} and issued["api_key"] != first

    listed = key_rows(run(capsys, "keys", "alice", data_dir=tmp_path).out)
    assert [row[2] for row in listed] == ["active", "active"]
    assert listed[1][0] == issued["key_id"]
    old = listed[0][0]

    printed = run(capsys, "revoke-key", "alice", old, data_dir=tmp_path)
    assert old in printed.out and "warning" not in printed.err
    assert [row[2] for row in key_rows(run(capsys, "keys", "alice", data_dir=tmp_path).out)] == [
        "revoked",
        "active",
    ]
    with Catalog(tmp_path) as catalog:
        with pytest.raises(Unauthorized):
            catalog.authenticate(first)
        assert catalog.authenticate(issued["api_key"]) == "alice"

    again = run(capsys, "revoke-key", "alice", old, data_dir=tmp_path, status=1)
    assert f"no active key '{old}'" in again.err
    # The last key may go offline (the admin's tool), with a warning saying how to recover.
    last = run(capsys, "revoke-key", "alice", issued["key_id"], data_dir=tmp_path)
    assert "no active key left" in last.err


def test_quotas_set_offline_hold_for_the_next_upload(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    loaded = tiny_loaded("llama")
    run(capsys, "create", "alice", data_dir=tmp_path)
    shown = fields(run(capsys, "show", "alice", data_dir=tmp_path).out)
    assert shown == {
        "tenant": "alice",
        "created_at": shown["created_at"],
        "max_prefixes": str(DEFAULT_QUOTAS.max_prefixes),
        "max_bytes": str(DEFAULT_QUOTAS.max_bytes),
        "max_virtual_tokens": "no limit",
        "prefixes": "0",
        "bytes": "0",
    }

    after = fields(
        run(capsys, "quotas", "alice", "--max-virtual-tokens", "4", data_dir=tmp_path).out
    )
    assert after == {**shown, "max_virtual_tokens": "4"}
    with open_registry(tmp_path, loaded) as registry:
        registry.upload("alice", "short", native_files(loaded.spec, 4, seed=0))
        with pytest.raises(QuotaExceeded, match="max_virtual_tokens = 4"):
            registry.upload("alice", "long", native_files(loaded.spec, 5, seed=1))

    argv = ["quotas", "alice", "--max-virtual-tokens", "default", "--max-prefixes", "1"]
    after = fields(run(capsys, *argv, data_dir=tmp_path).out)
    assert (after["max_prefixes"], after["max_virtual_tokens"], after["prefixes"]) == (
        "1",
        "no limit",
        "1",
    )
    with open_registry(tmp_path, loaded) as registry:
        with pytest.raises(QuotaExceeded, match="max_prefixes = 1"):
            registry.upload("alice", "long", native_files(loaded.spec, 5, seed=1))
        registry.upload("alice", "short", native_files(loaded.spec, 5, seed=1), overwrite=True)


@pytest.mark.parametrize("value", ["-1", "2.5", "many", str(2**31)])
def test_an_invalid_quota_is_refused_before_anything_changes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    run(capsys, "create", "alice", data_dir=tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["tenant", "quotas", "alice", "--max-prefixes", value, "--data-dir", str(tmp_path)])
    assert exit_.value.code == 2
    assert f"expected an integer from 0 to {2**31 - 1} or 'default'" in capsys.readouterr().err
    shown = fields(run(capsys, "show", "alice", data_dir=tmp_path).out)
    assert shown["max_prefixes"] == str(DEFAULT_QUOTAS.max_prefixes)


@pytest.mark.parametrize(
    "argv",
    [
        ["show", "nobody"],
        ["quotas", "nobody", "--max-bytes", "10"],
        ["keys", "nobody"],
        ["issue-key", "nobody"],
        ["revoke-key", "nobody", "0123456789ab"],
    ],
)
def test_an_unknown_tenant_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    printed = run(capsys, *argv, data_dir=tmp_path, status=1)
    assert printed.out == ""
    assert printed.err.strip() == "error: tenant 'nobody' does not exist"
