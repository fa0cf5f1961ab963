"""Fine-tuning records on the registry's database: tenants' training files, jobs and events.

The HTTP side asks for files and jobs as a tenant (another tenant's are NotFound); the training
worker moves jobs through their statuses. A job that succeeds is marked so inside the same
transaction that registers its prefix (`on_commit`), so a job is never `succeeded` without its
prefix, nor a prefix registered for a job that was cancelled meanwhile.

A running job is held by one runner (a server process) under a lease that runner's heartbeat
renews (`renew`); a job whose lease expired is taken over by another (`take_over`) and resumes
from its last checkpoint (prefixes/tuning/checkpointing.py). What a runner writes about a job
(a failure, its success, a checkpoint) counts only while it holds the lease.

Thread-safe: every method runs in its own transaction.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Connection, Engine

from prefixes.catalog import tenants as tenant_rows
from prefixes.catalog.catalog import OnCommit
from prefixes.catalog.records import DEFAULT_QUOTAS, PrefixInfo
from prefixes.errors import AlreadyExists, InvalidArgument, InvalidState, NotFound, QuotaExceeded
from prefixes.storage.database import read_transaction, write_transaction
from prefixes.tuning import files as file_rows
from prefixes.tuning import jobs as job_rows
from prefixes.tuning.records import (
    FILE_PURPOSE,
    FileInfo,
    JobError,
    JobEvent,
    JobInfo,
    JobSpec,
    JobStatus,
    Limits,
    Listing,
)

MAX_PAGE = 1000


class Tuning:
    def __init__(self, database: Engine, limits: Limits | None = None) -> None:
        self.database = database
        self.limits = limits or Limits()

    # Training files -----------------------------------------------------------------------

    def add_file(
        self, tenant: str, filename: str, purpose: str, content: bytes, num_examples: int
    ) -> FileInfo:
        """Store a validated training file, within the tenant's count and byte limits."""
        with write_transaction(self.database) as connection:
            tenant_rows.get_tenant(connection, tenant, DEFAULT_QUOTAS)
            count, total = file_rows.usage(connection, tenant)
            if count + 1 > self.limits.max_files:
                raise QuotaExceeded(tenant, "max_files", self.limits.max_files, count + 1)
            if total + len(content) > self.limits.max_file_bytes:
                limit = self.limits.max_file_bytes
                raise QuotaExceeded(tenant, "max_file_bytes", limit, total + len(content))
            return file_rows.add(connection, tenant, filename, purpose, content, num_examples)

    def list_files(
        self, tenant: str, *, purpose: str | None = None, limit: int = 100, after: str | None = None
    ) -> Listing[FileInfo]:
        _check_limit(limit)
        with read_transaction(self.database) as connection:
            before = None
            if after is not None:
                before = self._file_row(connection, tenant, after, field="after").seq
            rows = file_rows.page(connection, tenant, purpose, limit, before)
        return Listing([file_rows.info(row) for row in rows[:limit]], len(rows) > limit)

    def get_file(self, tenant: str, file_id: str) -> FileInfo:
        with read_transaction(self.database) as connection:
            return file_rows.info(self._file_row(connection, tenant, file_id))

    def file_content(self, tenant: str, file_id: str) -> bytes:
        with read_transaction(self.database) as connection:
            content = file_rows.content(connection, tenant, file_id)
        if content is None:
            raise _file_not_found(file_id, "file_id")
        return content

    def delete_file(self, tenant: str, file_id: str) -> FileInfo:
        """Delete at once, unless a job that has not finished still needs the file."""
        with write_transaction(self.database) as connection:
            found = self._file_row(connection, tenant, file_id)
            user = job_rows.active_using_file(connection, tenant, file_id)
            if user is not None:
                raise InvalidState(
                    f"file {file_id} is used by job {user}, which has not finished: cancel the "
                    "job or wait for it to end",
                    field="file_id",
                )
            file_rows.remove(connection, found.seq)
        return file_rows.info(found)

    # Jobs, as a tenant --------------------------------------------------------------------

    def create_job(self, tenant: str, spec: JobSpec) -> JobInfo:
        """A new job in `validating_files`: its files are the tenant's training files, the
        tenant has room for one more active job, and no active job will register `suffix`."""
        with write_transaction(self.database) as connection:
            tenant_rows.get_tenant(connection, tenant, DEFAULT_QUOTAS)
            for field, file_id in (
                ("training_file", spec.training_file),
                ("validation_file", spec.validation_file),
            ):
                if file_id is not None:
                    found = self._file_row(connection, tenant, file_id, field=field)
                    if found.purpose != FILE_PURPOSE:
                        raise InvalidArgument(field, f"a {FILE_PURPOSE} file", found.purpose)
            active = job_rows.count_active(connection, tenant)
            if active + 1 > self.limits.max_active_jobs:
                limit = self.limits.max_active_jobs
                raise QuotaExceeded(tenant, "max_active_jobs", limit, active + 1)
            taken = job_rows.active_with_suffix(connection, tenant, spec.suffix)
            if taken is not None:
                raise AlreadyExists(
                    f"suffix: job {taken} will already register {tenant}/{spec.suffix}",
                    field="suffix",
                )
            job = job_rows.add(connection, tenant, spec)
            job_rows.add_event(connection, job.id, f"Created fine-tuning job: {job.id}")
            job_rows.add_event(
                connection, job.id, f"Validating training file: {spec.training_file}"
            )
        return job

    def list_jobs(
        self, tenant: str, *, limit: int = 20, after: str | None = None
    ) -> Listing[JobInfo]:
        _check_limit(limit)
        with read_transaction(self.database) as connection:
            before = None
            if after is not None:
                before = self._job_row(connection, tenant, after, field="after").seq
            rows = job_rows.page(connection, tenant, limit, before)
        return Listing([job_rows.info(row) for row in rows[:limit]], len(rows) > limit)

    def get_job(self, tenant: str, job_id: str) -> JobInfo:
        with read_transaction(self.database) as connection:
            return job_rows.info(self._job_row(connection, tenant, job_id))

    def list_events(
        self, tenant: str, job_id: str, *, limit: int = 20, after: str | None = None
    ) -> Listing[JobEvent]:
        _check_limit(limit)
        before = None
        if after is not None:
            before = job_rows.event_seq(after)
            if before is None:
                raise InvalidArgument("after", "an event id from this listing", repr(after))
        with read_transaction(self.database) as connection:
            self._job_row(connection, tenant, job_id)
            rows = job_rows.events_page(connection, job_id, limit, before)
        return Listing([job_rows.event(row) for row in rows[:limit]], len(rows) > limit)

    def cancel(self, tenant: str, job_id: str) -> JobInfo:
        """Cancelled at once in the database; a running job's training stops at its next turn
        on the device, and whatever it trained is dropped."""
        with write_transaction(self.database) as connection:
            found = self._job_row(connection, tenant, job_id)
            status = JobStatus(found.status)
            if not status.active:
                raise InvalidState(
                    f"job {job_id} has already {_ended(status)}: only a job that is validating "
                    "files, queued or running can be cancelled",
                    field="job_id",
                )
            job_rows.move(
                connection, job_id, JobStatus.CANCELLED, [status], finished_at=time.time()
            )
            job_rows.add_event(connection, job_id, "Job cancelled")
            return job_rows.info(self._job_row(connection, tenant, job_id))

    # Jobs, as the training worker ---------------------------------------------------------

    def jobs(self, status: JobStatus) -> list[JobInfo]:
        with read_transaction(self.database) as connection:
            return [job_rows.info(row) for row in job_rows.with_status(connection, status)]

    def queue(self, job: JobInfo, message: str) -> bool:
        """Files validated: the job waits for a training slot (False if cancelled meanwhile)."""
        with write_transaction(self.database) as connection:
            moved = job_rows.move(
                connection, job.id, JobStatus.QUEUED, [JobStatus.VALIDATING_FILES]
            )
            if moved:
                job_rows.add_event(connection, job.id, message)
        return moved

    def start_queued(self, max_running: int, *, runner: str, lease_s: float) -> list[JobInfo]:
        """Move queued jobs to running, oldest first, keeping one running job per tenant and
        `max_running` in all; each under `runner`'s lease for `lease_s` seconds. Return those
        started."""
        started = []
        with write_transaction(self.database) as connection:
            running = job_rows.with_status(connection, JobStatus.RUNNING)
            owners = {row.owner for row in running}
            free = max_running - len(running)
            now = time.time()
            for row in job_rows.with_status(connection, JobStatus.QUEUED):
                if free <= 0:
                    break
                if row.owner in owners:
                    continue
                job_rows.move(
                    connection,
                    row.id,
                    JobStatus.RUNNING,
                    [JobStatus.QUEUED],
                    started_at=now,
                    lease_owner=runner,
                    lease_expires_at=now + lease_s,
                )
                job_rows.add_event(connection, row.id, "Fine-tuning job started")
                owners.add(row.owner)
                free -= 1
                started.append(job_rows.info(job_rows.row(connection, row.id)))  # type: ignore[arg-type]
        return started

    def take_over(self, runner: str, lease_s: float, limit: int) -> list[JobInfo]:
        """Up to `limit` running jobs whose runner stopped (its lease expired: a crash, a lost
        replica, or a clean stop that released it), oldest first, now under `runner`'s lease.
        They resume from their last checkpoint."""
        if limit <= 0:
            return []
        taken = []
        with write_transaction(self.database) as connection:
            now = time.time()
            for row in job_rows.orphans(connection, now)[:limit]:
                job_rows.lease(connection, row.id, runner, now + lease_s)
                job_rows.add_event(
                    connection,
                    row.id,
                    "The server training this job stopped: the job resumes from its last "
                    "checkpoint",
                )
                taken.append(job_rows.info(job_rows.row(connection, row.id)))  # type: ignore[arg-type]
        return taken

    def renew(self, runner: str, job_ids: list[str], lease_s: float) -> set[str]:
        """The heartbeat: extend `runner`'s leases; return the jobs it still holds (a job
        cancelled, or taken over after a lease expired, is missing: its training stops)."""
        if not job_ids:
            return set()
        with write_transaction(self.database) as connection:
            return job_rows.renew(connection, runner, job_ids, time.time() + lease_s)

    def release(self, runner: str) -> list[str]:
        """A clean stop: the runner's jobs can be taken over at once, by the next start or by
        another replica, instead of when their leases expire. Returns them."""
        with write_transaction(self.database) as connection:
            return job_rows.release(connection, runner)

    def files_of(self, job: JobInfo) -> tuple[bytes, bytes | None]:
        """The job's training and validation files (kept while the job is active)."""
        training = self.file_content(job.owner, job.spec.training_file)
        validation = job.spec.validation_file
        return training, None if validation is None else self.file_content(job.owner, validation)

    def event(
        self,
        job: JobInfo,
        message: str,
        *,
        level: str = "info",
        type_: str = "message",
        data: dict[str, Any] | None = None,
    ) -> None:
        with write_transaction(self.database) as connection:
            job_rows.add_event(connection, job.id, message, level=level, type_=type_, data=data)

    def fail(self, job: JobInfo, error: JobError, *, runner: str | None = None) -> bool:
        """Mark an active job failed (False if it had ended, e.g. cancelled, meanwhile, or,
        with `runner`, if that runner no longer holds it)."""
        with write_transaction(self.database) as connection:
            return _fail(connection, job.id, error, held_by=runner)

    def succeed_on_commit(
        self, job: JobInfo, trained_tokens: int, *, runner: str | None = None
    ) -> OnCommit:
        """For `Registry.upload(on_commit=...)`: marks the job succeeded in the transaction that
        registers its prefix, or refuses (InvalidState), rolling the prefix back, if the job is
        no longer running (with `runner`: under that runner's lease)."""

        def succeed(connection: Connection, prefix: PrefixInfo) -> None:
            moved = job_rows.move(
                connection,
                job.id,
                JobStatus.SUCCEEDED,
                [JobStatus.RUNNING],
                held_by=runner,
                fine_tuned_model=prefix.id,
                trained_tokens=trained_tokens,
                finished_at=time.time(),
            )
            if not moved:
                raise InvalidState(f"job {job.id} is no longer running", field="job_id")
            job_rows.add_event(connection, job.id, f"New fine-tuned model created: {prefix.id}")
            job_rows.add_event(connection, job.id, "The job has successfully completed")

        return succeed

    # Internals ----------------------------------------------------------------------------

    def _file_row(
        self, connection: Connection, tenant: str, file_id: str, *, field: str = "file_id"
    ) -> Any:
        found = file_rows.row(connection, tenant, file_id)
        if found is None:
            raise _file_not_found(file_id, field)
        return found

    def _job_row(
        self, connection: Connection, tenant: str, job_id: str, *, field: str = "job_id"
    ) -> Any:
        found = job_rows.row(connection, job_id, tenant)
        if found is None:
            raise NotFound(f"fine-tuning job {job_id!r} not found", field=field)
        return found


def _fail(
    connection: Connection, job_id: str, error: JobError, *, held_by: str | None = None
) -> bool:
    active = [status for status in JobStatus if status.active]
    moved = job_rows.move(
        connection,
        job_id,
        JobStatus.FAILED,
        active,
        held_by=held_by,
        error_code=error.code,
        error_message=error.message,
        error_param=error.param,
        finished_at=time.time(),
    )
    if moved:
        job_rows.add_event(connection, job_id, f"Job failed: {error.message}", level="error")
    return moved


def _file_not_found(file_id: str, field: str) -> NotFound:
    return NotFound(f"file {file_id!r} not found", field=field)


def _check_limit(limit: int) -> None:
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidArgument("limit", f"between 1 and {MAX_PAGE}", limit)


def _ended(status: JobStatus) -> str:
    return {JobStatus.SUCCEEDED: "succeeded", JobStatus.FAILED: "failed"}.get(
        status, "been cancelled"
    )
