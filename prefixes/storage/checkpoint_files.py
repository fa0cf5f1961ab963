"""Fine-tuning checkpoints' tensor files: `checkpoints/<job id>/<sha256>.safetensors` in the
store every replica shares, so whichever runner takes a job over reads its checkpoints.

Written as the blob store writes prefixes (prefixes/storage/store.py): a temp file in the job's
folder, fsynced, renamed to its content address, the folder fsynced; the database row that names
the file commits after, so a row never names a file that a crash lost. A job's folder goes
whole when the job ends (with any file a crash left between the rename and the commit).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
from pathlib import Path

from prefixes.errors import CorruptBlob

FOLDER = "checkpoints"
SUFFIX = ".safetensors"
_JOB_ID = re.compile(r"ftjob-[0-9a-f]{24}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class CheckpointFiles:
    def __init__(self, store_root: Path) -> None:
        self.root = Path(store_root) / FOLDER
        self.root.mkdir(parents=True, exist_ok=True)

    def write(self, job_id: str, data: bytes) -> str:
        """Store `data` durably for the job; return its sha256."""
        sha256 = hashlib.sha256(data).hexdigest()
        folder = self._folder(job_id)
        if not folder.is_dir():
            folder.mkdir(exist_ok=True)
            _fsync_dir(self.root)
        temp = folder / f".{sha256}.{secrets.token_hex(6)}.partial"
        with open(temp, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, self.path(job_id, sha256))
        _fsync_dir(folder)  # the rename must survive a power cut before the row commits
        return sha256

    def read(self, job_id: str, sha256: str) -> bytes:
        """The file's bytes, checked against their address."""
        try:
            data = self.path(job_id, sha256).read_bytes()
        except FileNotFoundError:
            raise CorruptBlob(f"checkpoint {sha256} of job {job_id}: file missing") from None
        if hashlib.sha256(data).hexdigest() != sha256:
            raise CorruptBlob(f"checkpoint {sha256} of job {job_id}: bytes do not match")
        return data

    def remove(self, job_id: str, sha256: str) -> None:
        self.path(job_id, sha256).unlink(missing_ok=True)

    def jobs(self) -> list[str]:
        """The jobs that have a folder here."""
        return sorted(p.name for p in self.root.iterdir() if _JOB_ID.fullmatch(p.name))

    def remove_job(self, job_id: str) -> None:
        shutil.rmtree(self._folder(job_id), ignore_errors=True)

    def path(self, job_id: str, sha256: str) -> Path:
        if not _SHA256.fullmatch(sha256):  # digests come from the database: never a path
            raise CorruptBlob(f"sha256: expected 64 lowercase hex digits, found {sha256!r}")
        return self._folder(job_id) / f"{sha256}{SUFFIX}"

    def _folder(self, job_id: str) -> Path:
        if not _JOB_ID.fullmatch(job_id):
            raise ValueError(f"job id: expected ftjob- and 24 hex digits, found {job_id!r}")
        return self.root / job_id


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
