"""Durable tensor files, content-addressed by sha256 and published atomically.

A file is written under `tmp/<workspace>/`, fsynced, then renamed into
`blobs/<first 2 hex>/<sha256>.safetensors` and the directory fsynced. Nothing here knows about the
database: the registry publishes a file before it commits the row that points to it, and sweeps
files no row points to when it opens.

Each open store writes its temp files in its own workspace `tmp/<id>/`, beside a lock file
`tmp/<id>.lock` held with flock for as long as the store is open. A sweep removes only workspaces
whose lock it can take: their owner is gone (the kernel drops the locks of a killed process), so
another live process's upload is never swept away.
"""

from __future__ import annotations

import enum
import fcntl
import hashlib
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from prefixes.errors import CorruptBlob

SUFFIX = ".safetensors"
LOCK_SUFFIX = ".lock"
PENDING_SUFFIX = ".pending"
_SHA256 = re.compile(r"[0-9a-f]{64}")


class UploadStage(enum.StrEnum):
    """Points of an upload, in order; a crash between any two leaves all or nothing visible."""

    TEMP_WRITTEN = "temp_written"  # bytes written to tmp/, not yet fsynced
    TEMP_SYNCED = "temp_synced"  # temp file durable, not yet in blobs/
    BLOB_RENAMED = "blob_renamed"  # file in blobs/ and its directory fsynced; no row yet
    ROW_WRITTEN = "row_written"  # row inserted inside the open transaction, not committed
    COMMITTED = "committed"  # the prefix is visible


StageHook = Callable[[UploadStage], None]


def _no_hook(stage: UploadStage) -> None:
    pass


@dataclass(frozen=True, slots=True)
class StagedBlob:
    """A durable temp file waiting to be published under its content address."""

    sha256: str
    size: int
    temp_path: Path


class BlobStore:
    def __init__(self, root: Path, on_stage: StageHook | None = None) -> None:
        self.blobs_dir = root / "blobs"
        self.temp_root = root / "tmp"
        self.blobs_dir.mkdir(parents=True, exist_ok=True)
        self.temp_root.mkdir(parents=True, exist_ok=True)
        self._on_stage = on_stage or _no_hook
        self.workspace, self._lock_fd = _open_workspace(self.temp_root)

    def close(self) -> None:
        if self._lock_fd >= 0:
            shutil.rmtree(self.workspace, ignore_errors=True)
            self.workspace.with_name(self.workspace.name + LOCK_SUFFIX).unlink(missing_ok=True)
            os.close(self._lock_fd)
            self._lock_fd = -1

    def path(self, sha256: str) -> Path:
        if not _SHA256.fullmatch(sha256):  # digests come from the database: never a path
            raise CorruptBlob(f"sha256: expected 64 lowercase hex digits, found {sha256!r}")
        return self.blobs_dir / sha256[:2] / f"{sha256}{SUFFIX}"

    def stage(self, data: bytes, *, report: bool = True) -> StagedBlob:
        """Write `data` to a durable temp file. `report=False` keeps it out of the stage hook:
        an upload of several files reports its stages once, with its last file."""
        on_stage = self._on_stage if report else _no_hook
        sha256 = hashlib.sha256(data).hexdigest()
        temp_path = self.workspace / f"{sha256}.{secrets.token_hex(6)}.partial"
        with open(temp_path, "wb") as file:
            file.write(data)
            file.flush()
            on_stage(UploadStage.TEMP_WRITTEN)
            os.fsync(file.fileno())
        on_stage(UploadStage.TEMP_SYNCED)
        return StagedBlob(sha256, len(data), temp_path)

    def publish(self, staged: StagedBlob, *, report: bool = True) -> None:
        """Move a staged file to its address. Identical bytes already there are simply replaced,
        which also heals a damaged copy."""
        final = self.path(staged.sha256)
        if not final.parent.is_dir():
            final.parent.mkdir(exist_ok=True)
            _fsync_dir(self.blobs_dir)
        os.replace(staged.temp_path, final)
        _fsync_dir(final.parent)  # the rename itself must survive a power cut before the commit
        if report:
            self._on_stage(UploadStage.BLOB_RENAMED)

    def discard(self, staged: StagedBlob) -> None:
        staged.temp_path.unlink(missing_ok=True)

    def read(self, sha256: str) -> bytes:
        """The file's bytes, checked against their address."""
        try:
            data = self.path(sha256).read_bytes()
        except FileNotFoundError:
            raise CorruptBlob(f"blob {sha256}: file missing from {self.blobs_dir}") from None
        if hashlib.sha256(data).hexdigest() != sha256:
            raise CorruptBlob(f"blob {sha256}: bytes on disk do not match their sha256")
        return data

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def remove(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)

    def digests(self) -> set[str]:
        return {
            path.name.removesuffix(SUFFIX)
            for path in self.blobs_dir.glob(f"*/*{SUFFIX}")
            if _SHA256.fullmatch(path.name.removesuffix(SUFFIX))
        }

    def sweep_blobs(self, keep: Iterable[str]) -> list[str]:
        """Delete every blob not in `keep`. The caller holds the database's write lock, so no
        upload is between publishing its file and committing its row."""
        removed = sorted(self.digests() - set(keep))
        for sha256 in removed:
            self.remove(sha256)
        return removed

    def sweep_temp(self) -> list[str]:
        """Delete the temp workspaces of stores that are gone; return their names."""
        removed = []
        for entry in sorted(self.temp_root.iterdir()):
            if entry.name.endswith(LOCK_SUFFIX):
                if _lock_is_free(entry):
                    workspace = entry.with_name(entry.name.removesuffix(LOCK_SUFFIX))
                    shutil.rmtree(workspace, ignore_errors=True)
                    entry.unlink(missing_ok=True)  # last: until now the workspace looked owned
                    removed.append(workspace.name)
            elif entry.name.endswith(PENDING_SUFFIX):
                if _lock_is_free(entry):
                    entry.unlink(missing_ok=True)
                    removed.append(entry.name)
            # A workspace is created after its lock file, so one without a lock lost its owner.
            elif not entry.with_name(entry.name + LOCK_SUFFIX).exists():
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry.name)
        return removed


def _open_workspace(temp_root: Path) -> tuple[Path, int]:
    """Create `tmp/<id>.lock` already locked (locked under a pending name, then renamed), then
    `tmp/<id>/`. A sweep that raced us to the pending file makes the rename fail: try again."""
    for _ in range(5):
        name = f"{os.getpid()}-{secrets.token_hex(4)}"
        pending = temp_root / f"{name}{PENDING_SUFFIX}"
        fd = os.open(pending, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            os.rename(pending, temp_root / f"{name}{LOCK_SUFFIX}")
        except FileNotFoundError:
            os.close(fd)
            continue
        workspace = temp_root / name
        workspace.mkdir()
        return workspace, fd
    raise OSError(f"could not create a temp workspace in {temp_root}")


def _lock_is_free(lock_path: Path) -> bool:
    try:
        fd = os.open(lock_path, os.O_RDWR)
    except FileNotFoundError:
        return False  # already removed by its owner or another sweep
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # also drops the lock if we took it
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
