"""Crash safety: kill an uploading process with SIGKILL at every stage of an upload.

Each child process opens the registry with a stage hook that kills it (SIGKILL: no cleanup, no
atexit, no flushing) when the upload reaches the named stage. On reopen the registry must hold
either the whole new version, tensors and metadata, or nothing of it, and the debris is swept.
Run as a script, this module is the child: `python -m tests.integration.test_registry_crash`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prefixes import ModelSpec, PrefixCompiler, read_upload
from prefixes.errors import NotFound
from prefixes.registry import Registry
from prefixes.storage.store import UploadStage
from tests.registry_support import blob_files, files_of, native_files

ROOT = Path(__file__).resolve().parents[2]
# A geometry without a model: prefix-tuning KV compiles by a cast, so the child needs no
# transformers import and starts in about two seconds.
SPEC = ModelSpec(
    num_layers=2, hidden_size=32, num_kv_heads=2, head_dim=8, vocab_size=64,
    max_positions=128, dtype="float32", weights_digest="crash-test",
)  # fmt: skip
MAX_TOKENS = 16
OLD, NEW = native_files(SPEC, 4, seed=1), native_files(SPEC, 6, seed=2)
MODES = ("new", "overwrite")
CHILD_MODULE = "tests.integration.test_registry_crash"


def no_soft_prompts(embeddings: torch.Tensor) -> torch.Tensor:
    raise AssertionError("only prefix-tuning uploads in this test")


def open_registry(data_dir: Path, **options) -> Registry:
    return Registry(data_dir, compiler=PrefixCompiler(SPEC, no_soft_prompts, MAX_TOKENS), **options)


def child(data_dir: Path, stage: UploadStage, mode: str) -> None:
    def kill_at(reached: UploadStage) -> None:
        if reached == stage:
            os.kill(os.getpid(), signal.SIGKILL)

    registry = open_registry(data_dir, on_stage=kill_at)
    registry.upload("alice", "pirate", NEW, overwrite=mode == "overwrite")
    sys.exit(3)  # unreachable when the hook fired


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    """Every (stage, mode): a data directory where a child died at that stage. The children
    run side by side; each mode starts from a registry with tenant alice (and, to overwrite,
    alice/pirate v1)."""
    root = tmp_path_factory.mktemp("crash")
    bases = {}
    for mode in MODES:
        bases[mode] = root / f"base-{mode}"
        with open_registry(bases[mode]) as registry:
            registry.create_tenant("alice")
            if mode == "overwrite":
                registry.upload("alice", "pirate", OLD)
    runs = {}
    for stage in UploadStage:
        for mode in MODES:
            data_dir = root / f"{mode}-{stage.value}"
            shutil.copytree(bases[mode], data_dir)
            command = [sys.executable, "-m", CHILD_MODULE, str(data_dir), stage.value, mode]
            runs[stage, mode] = (data_dir, subprocess.Popen(command, cwd=ROOT))
    return {key: (data_dir, process.wait(timeout=120)) for key, (data_dir, process) in runs.items()}


def leftovers(data_dir: Path) -> tuple[int, int]:
    """Temp files and tensor files on disk, before any sweep."""
    return len(list((data_dir / "tmp").rglob("*.partial"))), len(blob_files(data_dir))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stage", list(UploadStage))
def test_a_killed_upload_leaves_all_or_nothing(crashed, stage, mode):
    data_dir, returncode = crashed[stage, mode]
    assert returncode == -signal.SIGKILL
    # Each version stores two files, its compiled KV and its parameters, staged and published
    # together; the stages are reported with the second.
    old_files = 2 if mode == "overwrite" else 0
    # The kill happened where it was meant to: what is on disk shows the stage.
    expected_debris = {
        UploadStage.TEMP_WRITTEN: (2, old_files),
        UploadStage.TEMP_SYNCED: (2, old_files),
        UploadStage.BLOB_RENAMED: (0, old_files + 2),
        UploadStage.ROW_WRITTEN: (0, old_files + 2),
        UploadStage.COMMITTED: (0, old_files + 2),
    }[stage]
    assert leftovers(data_dir) == expected_debris

    with open_registry(data_dir) as registry:
        committed = stage == UploadStage.COMMITTED
        if mode == "new" and not committed:
            with pytest.raises(NotFound):
                registry.get("pirate", tenant="alice")
            live = set()
        else:
            info = registry.get("pirate", tenant="alice")
            files, version = (NEW, 1 if mode == "new" else 2) if committed else (OLD, 1)
            assert info.version == version
            assert info.num_virtual_tokens == read_upload(files).num_virtual_tokens
            with registry.acquire("pirate", tenant="alice") as handle:
                assert torch.equal(handle.prefix.kv, read_upload(files).tensor)
            live = files_of(info)
        # Orphans swept: only live files remain, and no temp file but the open registry's own.
        assert blob_files(data_dir) == live
        assert not list((data_dir / "tmp").rglob("*.partial"))
        assert len(registry.list_prefixes(tenant="alice").items) == len(live) // 2


if __name__ == "__main__":
    child(Path(sys.argv[1]), UploadStage(sys.argv[2]), sys.argv[3])
