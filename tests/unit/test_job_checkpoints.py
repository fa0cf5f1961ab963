"""Fine-tuning checkpoints in the registry (prefixes/tuning/checkpointing.py): written only by
the runner holding the job, durable files named by content, the newest few kept, listed to the
job's owner alone, and their files dropped when the job ends."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import insert

from prefixes.errors import CorruptBlob, InvalidArgument, NotFound
from prefixes.storage.checkpoint_files import CheckpointFiles
from prefixes.storage.database import open_engine, sqlite_url
from prefixes.storage.schema import migrate, tenants
from prefixes.tuning.checkpointing import Checkpoints
from prefixes.tuning.records import JobInfo, JobStatus
from prefixes.tuning.tuning import Tuning
from tests.unit.test_tuning_records import job_for


@pytest.fixture
def tuning(tmp_path: Path) -> Tuning:
    engine = open_engine(sqlite_url(tmp_path))
    migrate(engine)
    with engine.begin() as connection:
        for name in ("alice", "bob"):
            connection.execute(insert(tenants).values(name=name, created_at=0.0))
    return Tuning(engine)


@pytest.fixture
def checkpoints(tuning: Tuning, tmp_path: Path) -> Checkpoints:
    return Checkpoints(tuning.database, CheckpointFiles(tmp_path / "store"), keep=2)


def running_job(tuning: Tuning, runner: str = "a") -> JobInfo:
    job_for(tuning, "alice")
    (job,) = tuning.jobs(JobStatus.VALIDATING_FILES)
    tuning.queue(job, "validated")
    (started,) = tuning.start_queued(1, runner=runner, lease_s=60)
    return started


def save(checkpoints: Checkpoints, job: JobInfo, step: int, runner: str = "a") -> bool:
    return checkpoints.save(
        job,
        runner,
        step=step,
        metrics={"step": step, "train_loss": 1.0 / step},
        state={"step": step},
        tensors=f"tensors of step {step}".encode(),
    )


def test_the_runner_holding_a_job_keeps_its_newest_checkpoints(
    tuning: Tuning, checkpoints: Checkpoints
) -> None:
    job = running_job(tuning)
    assert checkpoints.latest(job) is None
    for step in (1, 2, 3):
        assert save(checkpoints, job, step)
    found = checkpoints.latest(job)
    assert found is not None and found[0].step == 3 and found[1] == b"tensors of step 3"
    assert found[0].state == {"step": 3} and found[0].metrics["train_loss"] == 1 / 3
    listing = checkpoints.listing("alice", job.id)
    assert [c.step for c in listing.items] == [3, 2] and not listing.has_more  # keep=2
    folder = checkpoints.files.root / job.id
    assert len(list(folder.glob("*.safetensors"))) == 2  # step 1's file went with its row
    # Another runner, without the lease, writes nothing.
    assert not save(checkpoints, job, 4, runner="b")
    assert [c.step for c in checkpoints.listing("alice", job.id).items] == [3, 2]


def test_checkpoints_are_listed_in_pages_to_the_jobs_owner_only(
    tuning: Tuning, checkpoints: Checkpoints
) -> None:
    job = running_job(tuning)
    for step in (1, 2):
        save(checkpoints, job, step)
    first = checkpoints.listing("alice", job.id, limit=1)
    assert [c.step for c in first.items] == [2] and first.has_more
    rest = checkpoints.listing("alice", job.id, limit=1, after=first.items[0].id)
    assert [c.step for c in rest.items] == [1] and not rest.has_more
    with pytest.raises(NotFound):
        checkpoints.listing("bob", job.id)
    with pytest.raises(NotFound):
        checkpoints.listing("alice", "ftjob-" + "0" * 24)
    with pytest.raises(InvalidArgument, match="after"):
        checkpoints.listing("alice", job.id, after="ftevent-1")
    with pytest.raises(InvalidArgument, match="limit"):
        checkpoints.listing("alice", job.id, limit=0)


def test_damaged_checkpoint_bytes_are_refused(tuning: Tuning, checkpoints: Checkpoints) -> None:
    job = running_job(tuning)
    save(checkpoints, job, 1)
    (path,) = (checkpoints.files.root / job.id).glob("*.safetensors")
    path.write_bytes(b"flipped")
    with pytest.raises(CorruptBlob, match="do not match"):
        checkpoints.latest(job)


def test_a_jobs_files_go_when_it_ends_and_its_steps_stay_listed(
    tuning: Tuning, checkpoints: Checkpoints
) -> None:
    job = running_job(tuning)
    save(checkpoints, job, 1)
    (checkpoints.files.root / job.id / ".left-by-a-crash.partial").write_bytes(b"x")
    assert checkpoints.sweep() == []  # still running
    tuning.cancel("alice", job.id)
    assert checkpoints.sweep() == [job.id]
    assert not (checkpoints.files.root / job.id).exists()
    assert [c.step for c in checkpoints.listing("alice", job.id).items] == [1]
