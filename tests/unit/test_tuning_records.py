"""Fine-tuning records in the registry's database (prefixes/tuning/tuning.py): the job's
statuses, the training slots, leases across restarts and replicas, and success committed with
the prefix or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import insert, inspect, select

from prefixes.errors import InvalidState, NotFound, QuotaExceeded
from prefixes.formats.kinds import PrefixKind
from prefixes.storage.database import open_engine, sqlite_url
from prefixes.storage.schema import (
    MIGRATIONS,
    migrate,
    prefixes,
    schema_version,
    tenants,
    training_files,
)
from prefixes.tuning.records import Hyperparameters, JobError, JobSpec, JobStatus, Limits
from prefixes.tuning.tuning import Tuning
from tests.registry_support import blob_files, native_files, open_registry
from tests.tiny import tiny_loaded


def spec(file_id: str, suffix: str = "mine") -> JobSpec:
    return JobSpec(
        model="base",
        training_file=file_id,
        validation_file=None,
        method=PrefixKind.PREFIX_TUNING,
        num_virtual_tokens=4,
        hyperparameters=Hyperparameters(1, 1, 1.0),
        suffix=suffix,
        seed=0,
    )


@pytest.fixture
def tuning(tmp_path: Path) -> Tuning:
    engine = open_engine(sqlite_url(tmp_path))
    migrate(engine)
    with engine.begin() as connection:
        for name in ("alice", "bob", "carol"):
            connection.execute(insert(tenants).values(name=name, created_at=0.0))
    return Tuning(engine, Limits(max_files=10, max_file_bytes=1000, max_active_jobs=3))


def job_for(tuning: Tuning, tenant: str, suffix: str = "mine") -> str:
    file_id = tuning.add_file(tenant, "t.jsonl", "fine-tune", b"{}", 1).id
    return tuning.create_job(tenant, spec(file_id, suffix)).id


def status(tuning: Tuning, tenant: str, job_id: str) -> JobStatus:
    return tuning.get_job(tenant, job_id).status


def test_queued_jobs_start_oldest_first_one_per_tenant_within_the_cap(tuning: Tuning) -> None:
    jobs = [job_for(tuning, t, s) for t, s in [("alice", "a"), ("alice", "b"), ("bob", "c")]]
    jobs.append(job_for(tuning, "carol"))
    for job in tuning.jobs(JobStatus.VALIDATING_FILES):
        assert tuning.queue(job, "validated")
    started = tuning.start_queued(max_running=2, runner="r", lease_s=60)
    assert [job.id for job in started] == [jobs[0], jobs[2]]  # alice's second waits for her first
    assert all(job.status is JobStatus.RUNNING and job.started_at for job in started)
    assert tuning.start_queued(max_running=2, runner="r", lease_s=60) == []  # the cap is full
    assert tuning.fail(started[0], JobError("x", "broken"))
    assert [job.id for job in tuning.start_queued(max_running=2, runner="r", lease_s=60)] == [
        jobs[1]
    ]


def test_a_job_cancelled_before_its_prefix_commits_registers_nothing(tmp_path: Path) -> None:
    loaded = tiny_loaded("llama")
    with open_registry(tmp_path, loaded) as registry:
        registry.create_tenant("alice")
        tuning = Tuning(registry.database)
        job_id = job_for(tuning, "alice")
        (job,) = tuning.jobs(JobStatus.VALIDATING_FILES)
        tuning.queue(job, "validated")
        (job,) = tuning.start_queued(max_running=1, runner="r", lease_s=60)
        files = native_files(loaded.spec, 4, seed=0)
        tuning.cancel("alice", job_id)
        with pytest.raises(InvalidState, match="no longer running"):
            registry.upload("alice", "mine", files, on_commit=tuning.succeed_on_commit(job, 10))
        with pytest.raises(NotFound):
            registry.get("alice/mine", tenant="alice")
        assert blob_files(tmp_path) == set()
        assert status(tuning, "alice", job_id) is JobStatus.CANCELLED

        # The other order: the commit first, then the cancel is refused.
        other = job_for(tuning, "alice", "other")
        tuning.queue(tuning.get_job("alice", other), "validated")
        (job,) = tuning.start_queued(max_running=1, runner="r", lease_s=60)
        info = registry.upload("alice", "other", files, on_commit=tuning.succeed_on_commit(job, 7))
        done = tuning.get_job("alice", other)
        assert (done.status, done.fine_tuned_model, done.trained_tokens) == (
            JobStatus.SUCCEEDED, info.id, 7
        )  # fmt: skip
        with pytest.raises(InvalidState, match="already succeeded"):
            tuning.cancel("alice", other)


def test_a_running_job_is_held_by_its_runner_until_its_lease_expires(tuning: Tuning) -> None:
    running, queued = job_for(tuning, "alice"), job_for(tuning, "bob")
    validating = job_for(tuning, "carol")
    for job in tuning.jobs(JobStatus.VALIDATING_FILES)[:2]:
        tuning.queue(job, "validated")
    (job,) = tuning.start_queued(max_running=1, runner="a", lease_s=60)
    assert tuning.take_over("b", 60, limit=2) == []  # a's lease is live
    assert tuning.renew("a", [running], 60) == {running}
    assert not tuning.fail(job, JobError("x", "not b's"), runner="b")
    tuning.renew("a", [running], -1)  # a's heartbeat stopped: its lease expired
    assert [taken.id for taken in tuning.take_over("b", 60, limit=2)] == [running]
    assert tuning.renew("a", [running], 60) == set()  # a learns that it lost the job
    assert tuning.take_over("c", 60, limit=2) == []
    assert status(tuning, "alice", running) is JobStatus.RUNNING
    assert status(tuning, "bob", queued) is JobStatus.QUEUED
    assert status(tuning, "carol", validating) is JobStatus.VALIDATING_FILES
    messages = [event.message for event in tuning.list_events("alice", running).items]
    assert "resumes from its last checkpoint" in messages[0]
    # A clean stop releases the job: the next runner takes it over at once, within its cap.
    assert tuning.release("b") == [running]
    assert not tuning.fail(job, JobError("x", "late"), runner="b")  # b's late writes: refused
    assert tuning.take_over("c", 60, limit=0) == []
    assert [taken.id for taken in tuning.take_over("c", 60, limit=1)] == [running]
    tuning.cancel("alice", running)  # a cancel reaches the runner through its heartbeat
    assert tuning.renew("c", [running], 60) == set()
    assert not tuning.fail(job, JobError("x", "ended"), runner="c")


def test_limits_and_isolation(tuning: Tuning) -> None:
    with pytest.raises(QuotaExceeded, match="max_file_bytes"):
        tuning.add_file("alice", "t", "fine-tune", b"x" * 1001, 1)
    ids = [job_for(tuning, "alice", f"s{i}") for i in range(3)]
    with pytest.raises(QuotaExceeded, match="max_active_jobs"):
        job_for(tuning, "alice", "s3")
    tuning.cancel("alice", ids[0])
    job_for(tuning, "alice", "s3")
    for call in (
        lambda: tuning.get_job("bob", ids[1]),
        lambda: tuning.cancel("bob", ids[1]),
        lambda: tuning.list_events("bob", ids[1]),
        lambda: tuning.get_file("bob", tuning.get_job("alice", ids[1]).spec.training_file),
    ):
        with pytest.raises(NotFound):
            call()
    with pytest.raises(NotFound):
        tuning.add_file("nobody", "t", "fine-tune", b"{}", 1)


def test_version_2_adds_the_fine_tuning_tables_and_keeps_version_1s_rows(tmp_path: Path) -> None:
    engine = open_engine(sqlite_url(tmp_path))
    with engine.begin() as connection:  # a registry created by the code of version 1
        schema_version.create(connection)
        connection.execute(insert(schema_version).values(version=1))
        MIGRATIONS[0](connection)
        connection.execute(insert(tenants).values(name="alice", created_at=0.0))
    assert "training_files" not in inspect(engine).get_table_names()
    assert migrate(engine) == 1
    names = set(inspect(engine).get_table_names())
    assert {"training_files", "tuning_jobs", "tuning_events", "prefixes"} <= names
    with engine.begin() as connection:
        assert connection.execute(select(tenants.c.name)).scalars().all() == ["alice"]
        assert connection.execute(select(prefixes)).all() == []
        assert connection.execute(select(training_files)).all() == []
    engine.dispose()
