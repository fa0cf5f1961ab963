"""Checkpoints of running fine-tuning jobs: written by the runner that holds a job's lease,
read back by whichever runner takes the job over, listed to the job's owner.

A job keeps its `keep` newest checkpoints while it runs (so a job's checkpoints take at most
`keep` files, whatever its length); when it ends, their files go (the training state is no use
once nothing will resume it) and their rows stay, for the listing of steps and metrics.

Thread-safe: every method runs in its own transaction.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine

from prefixes.errors import InvalidArgument, NotFound
from prefixes.storage.checkpoint_files import CheckpointFiles
from prefixes.storage.database import read_transaction, write_transaction
from prefixes.tuning import checkpoints as checkpoint_rows
from prefixes.tuning import jobs as job_rows
from prefixes.tuning.records import Checkpoint, JobInfo, JobStatus, Listing

MAX_PAGE = 100


class Checkpoints:
    def __init__(self, database: Engine, files: CheckpointFiles, *, keep: int) -> None:
        if keep < 1:
            raise ValueError(f"keep: expected at least 1, found {keep}")
        self.database = database
        self.files = files
        self.keep = keep

    def save(
        self,
        job: JobInfo,
        runner: str,
        *,
        step: int,
        metrics: dict[str, Any],
        state: dict[str, Any],
        tensors: bytes,
    ) -> bool:
        """Store a checkpoint if `runner` still holds the job (False otherwise: another runner
        took it over, or it ended). The file is durable before its row commits."""
        sha256 = self.files.write(job.id, tensors)
        with write_transaction(self.database) as connection:
            if not job_rows.holds(connection, job.id, runner):
                # Its file stays until the job ends: a runner that holds the job may have
                # written the same bytes (the same step of the same job) under the same name.
                return False
            checkpoint_rows.add(connection, job.id, step, metrics, state, sha256, len(tensors))
            stale = checkpoint_rows.trim(connection, job.id, self.keep)
        for digest in stale:
            self.files.remove(job.id, digest)
        return True

    def latest(self, job: JobInfo) -> tuple[Checkpoint, bytes] | None:
        """The job's newest checkpoint and its tensors' bytes (CorruptBlob if they are lost)."""
        with read_transaction(self.database) as connection:
            rows = checkpoint_rows.newest(connection, job.id, 1, None)
        if not rows:
            return None
        found = checkpoint_rows.checkpoint(rows[0])
        return found, self.files.read(job.id, found.sha256)

    def listing(
        self, tenant: str, job_id: str, *, limit: int = 10, after: str | None = None
    ) -> Listing[Checkpoint]:
        """The tenant's job's checkpoints, newest first (another tenant's job: NotFound)."""
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidArgument("limit", f"between 1 and {MAX_PAGE}", limit)
        before = None
        if after is not None:
            before = checkpoint_rows.seq_of(after)
            if before is None:
                raise InvalidArgument("after", "a checkpoint id from this listing", repr(after))
        with read_transaction(self.database) as connection:
            if job_rows.row(connection, job_id, tenant) is None:
                raise NotFound(f"fine-tuning job {job_id!r} not found", field="job_id")
            rows = checkpoint_rows.newest(connection, job_id, limit + 1, before)
        found = [checkpoint_rows.checkpoint(row) for row in rows[:limit]]
        return Listing(found, len(rows) > limit)

    def sweep(self) -> list[str]:
        """Remove the files of every job that has ended (or is gone); return those jobs."""
        job_ids = self.files.jobs()
        if not job_ids:
            return []
        with read_transaction(self.database) as connection:
            statuses = job_rows.statuses(connection, job_ids)
        ended = [
            job_id for job_id in job_ids if not (job_id in statuses and statuses[job_id].active)
        ]
        for job_id in ended:
            self.files.remove_job(job_id)
        return ended


def _active(status: JobStatus | None) -> bool:
    return status is not None and status.active
