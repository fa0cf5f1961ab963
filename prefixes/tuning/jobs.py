"""Fine-tuning jobs and their events in the database: the SQL over `tuning_jobs` and
`tuning_events`, run in the caller's transaction.

A status changes only by `move`, which names the statuses it may leave: a cancel and the end of
a training run that race each other cannot both win, whichever commits first.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, func, insert, select, update

from prefixes.catalog.records import timestamp
from prefixes.formats.kinds import PrefixKind
from prefixes.storage.schema import parse_seq, tuning_events, tuning_jobs
from prefixes.tuning.records import (
    Hyperparameters,
    JobError,
    JobEvent,
    JobInfo,
    JobSpec,
    JobStatus,
)

JOB_PREFIX = "ftjob-"
EVENT_PREFIX = "ftevent-"
ACTIVE = [status.value for status in JobStatus if status.active]


def add(connection: Connection, owner: str, spec: JobSpec) -> JobInfo:
    hyper = spec.hyperparameters
    values = {
        "id": JOB_PREFIX + secrets.token_hex(12),
        "owner": owner,
        "model": spec.model,
        "training_file": spec.training_file,
        "validation_file": spec.validation_file,
        "method": spec.method.value,
        "num_virtual_tokens": spec.num_virtual_tokens,
        "n_epochs": hyper.n_epochs,
        "batch_size": hyper.batch_size,
        "learning_rate_multiplier": hyper.learning_rate_multiplier,
        "suffix": spec.suffix,
        "seed": spec.seed,
        "status": JobStatus.VALIDATING_FILES.value,
        "created_at": time.time(),
    }
    connection.execute(insert(tuning_jobs).values(**values))
    return info_from(values)


def row(connection: Connection, job_id: str, owner: str | None = None) -> Row[Any] | None:
    """The job; with `owner`, only if it is that tenant's."""
    query = select(tuning_jobs).where(tuning_jobs.c.id == job_id)
    if owner is not None:
        query = query.where(tuning_jobs.c.owner == owner)
    return connection.execute(query).one_or_none()


def page(connection: Connection, owner: str, limit: int, before: int | None) -> list[Row[Any]]:
    """Up to `limit` + 1 of the tenant's jobs, newest first, created before `before` (a seq)."""
    query = select(tuning_jobs).where(tuning_jobs.c.owner == owner)
    if before is not None:
        query = query.where(tuning_jobs.c.seq < before)
    return list(connection.execute(query.order_by(tuning_jobs.c.seq.desc()).limit(limit + 1)))


def with_status(connection: Connection, status: JobStatus) -> list[Row[Any]]:
    """Every job in `status`, oldest first."""
    query = select(tuning_jobs).where(tuning_jobs.c.status == status.value)
    return list(connection.execute(query.order_by(tuning_jobs.c.seq)))


def count_active(connection: Connection, owner: str) -> int:
    query = select(func.count()).where(
        tuning_jobs.c.owner == owner, tuning_jobs.c.status.in_(ACTIVE)
    )
    return int(connection.execute(query).scalar_one())


def active_with_suffix(connection: Connection, owner: str, suffix: str) -> str | None:
    """The id of an active job of the tenant that will register `suffix`, if any."""
    query = select(tuning_jobs.c.id).where(
        tuning_jobs.c.owner == owner,
        tuning_jobs.c.suffix == suffix,
        tuning_jobs.c.status.in_(ACTIVE),
    )
    return connection.execute(query.limit(1)).scalar_one_or_none()


def active_using_file(connection: Connection, owner: str, file_id: str) -> str | None:
    """The id of an active job of the tenant that still reads this file, if any."""
    uses = (tuning_jobs.c.training_file == file_id) | (tuning_jobs.c.validation_file == file_id)
    query = select(tuning_jobs.c.id).where(
        tuning_jobs.c.owner == owner, uses, tuning_jobs.c.status.in_(ACTIVE)
    )
    return connection.execute(query.limit(1)).scalar_one_or_none()


def move(
    connection: Connection,
    job_id: str,
    to: JobStatus,
    leaving: Iterable[JobStatus],
    *,
    held_by: str | None = None,
    **values: Any,
) -> bool:
    """Set the job's status to `to` (and `values`) if it is now in one of `leaving` (and, with
    `held_by`, its lease is that runner's: a runner that lost its job changes nothing)."""
    query = update(tuning_jobs).where(
        tuning_jobs.c.id == job_id,
        tuning_jobs.c.status.in_([status.value for status in leaving]),
    )
    if held_by is not None:
        query = query.where(tuning_jobs.c.lease_owner == held_by)
    return connection.execute(query.values(status=to.value, **values)).rowcount == 1


def orphans(connection: Connection, now: float) -> list[Row[Any]]:
    """Running jobs whose lease expired (their runner stopped), oldest first. NULL: a job
    from before leases existed, or one whose runner released it on a clean stop."""
    expired = tuning_jobs.c.lease_expires_at.is_(None) | (tuning_jobs.c.lease_expires_at < now)
    query = select(tuning_jobs).where(tuning_jobs.c.status == JobStatus.RUNNING.value, expired)
    return list(connection.execute(query.order_by(tuning_jobs.c.seq)))


def lease(connection: Connection, job_id: str, runner: str, expires_at: float) -> None:
    connection.execute(
        update(tuning_jobs)
        .where(tuning_jobs.c.id == job_id)
        .values(lease_owner=runner, lease_expires_at=expires_at)
    )


def renew(connection: Connection, runner: str, job_ids: list[str], expires_at: float) -> set[str]:
    """Extend the runner's leases on `job_ids`; return those it still holds (running, its)."""
    held = (
        (tuning_jobs.c.id.in_(job_ids))
        & (tuning_jobs.c.lease_owner == runner)
        & (tuning_jobs.c.status == JobStatus.RUNNING.value)
    )
    connection.execute(update(tuning_jobs).where(held).values(lease_expires_at=expires_at))
    return set(connection.execute(select(tuning_jobs.c.id).where(held)).scalars())


def release(connection: Connection, runner: str) -> list[str]:
    """End the runner's leases now, so the next runner takes its jobs over without waiting, and
    nothing the runner might still write about them counts; return the jobs released."""
    held = (tuning_jobs.c.lease_owner == runner) & (tuning_jobs.c.status == JobStatus.RUNNING.value)
    released = list(connection.execute(select(tuning_jobs.c.id).where(held)).scalars())
    ended = {"lease_owner": None, "lease_expires_at": None}
    connection.execute(update(tuning_jobs).where(held).values(**ended))
    return released


def holds(connection: Connection, job_id: str, runner: str) -> bool:
    """Whether the job is running under the runner's lease."""
    query = select(tuning_jobs.c.id).where(
        tuning_jobs.c.id == job_id,
        tuning_jobs.c.lease_owner == runner,
        tuning_jobs.c.status == JobStatus.RUNNING.value,
    )
    return connection.execute(query).first() is not None


def statuses(connection: Connection, job_ids: list[str]) -> dict[str, JobStatus]:
    query = select(tuning_jobs.c.id, tuning_jobs.c.status).where(tuning_jobs.c.id.in_(job_ids))
    return {job_id: JobStatus(status) for job_id, status in connection.execute(query)}


def add_event(
    connection: Connection,
    job_id: str,
    message: str,
    *,
    level: str = "info",
    type_: str = "message",
    data: dict[str, Any] | None = None,
) -> None:
    connection.execute(
        insert(tuning_events).values(
            job_id=job_id,
            created_at=time.time(),
            level=level,
            type=type_,
            message=message,
            data=None if data is None else json.dumps(data),
        )
    )


def events_page(
    connection: Connection, job_id: str, limit: int, before: int | None
) -> list[Row[Any]]:
    """Up to `limit` + 1 of the job's events, newest first, older than `before` (a seq)."""
    query = select(tuning_events).where(tuning_events.c.job_id == job_id)
    if before is not None:
        query = query.where(tuning_events.c.seq < before)
    return list(connection.execute(query.order_by(tuning_events.c.seq.desc()).limit(limit + 1)))


def event_seq(event_id: str) -> int | None:
    if not event_id.startswith(EVENT_PREFIX):
        return None
    return parse_seq(event_id.removeprefix(EVENT_PREFIX))


def event(found: Row[Any]) -> JobEvent:
    return JobEvent(
        id=f"{EVENT_PREFIX}{found.seq}",
        job_id=found.job_id,
        created_at=timestamp(found.created_at),
        level=found.level,
        type=found.type,
        message=found.message,
        data=None if found.data is None else json.loads(found.data),
    )


def info(found: Row[Any]) -> JobInfo:
    return info_from(found._mapping)


def info_from(values: Any) -> JobInfo:
    spec = JobSpec(
        model=values["model"],
        training_file=values["training_file"],
        validation_file=values["validation_file"],
        method=PrefixKind(values["method"]),
        num_virtual_tokens=values["num_virtual_tokens"],
        hyperparameters=Hyperparameters(
            values["n_epochs"], values["batch_size"], values["learning_rate_multiplier"]
        ),
        suffix=values["suffix"],
        seed=values["seed"],
    )
    code = values.get("error_code")
    error = JobError(code, values["error_message"], values["error_param"]) if code else None
    return JobInfo(
        id=values["id"],
        owner=values["owner"],
        spec=spec,
        status=JobStatus(values["status"]),
        created_at=timestamp(values["created_at"]),
        started_at=_when(values.get("started_at")),
        finished_at=_when(values.get("finished_at")),
        fine_tuned_model=values.get("fine_tuned_model"),
        trained_tokens=values.get("trained_tokens"),
        error=error,
    )


def _when(seconds: float | None) -> datetime | None:
    return None if seconds is None else timestamp(seconds)
