"""The registry on a real PostgreSQL server that these tests start themselves (tests/postgres.py).

The same flows as on SQLite, then what PostgreSQL adds: several replicas on one database. A
"replica" here is a Registry of its own on the same database and the same data directory, as two
servers sharing a database and a file system are. Every write transaction holds one advisory
lock (prefixes.storage.database); the races below are the ones it exists to close.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from sqlalchemy import create_engine, inspect, select, text

from prefixes import read_upload
from prefixes.catalog.records import Quotas
from prefixes.errors import AlreadyExists, KeyLimit, NotFound, Unauthorized
from prefixes.formats.kinds import PrefixKind
from prefixes.registry import Registry
from prefixes.storage.checkpoint_files import CheckpointFiles
from prefixes.storage.schema import SCHEMA_VERSION, schema_version
from prefixes.storage.store import UploadStage
from prefixes.tuning.checkpointing import Checkpoints
from prefixes.tuning.records import Hyperparameters, JobSpec, JobStatus
from prefixes.tuning.tuning import Tuning
from tests.registry_support import (
    MAX_VIRTUAL_TOKENS,
    blob_files,
    files_of,
    native_files,
    open_registry,
    peft_files,
)
from tests.tiny import make_adapter, tiny_loaded

OpenReplica = Callable[..., Registry]


@pytest.fixture(scope="module")
def llama():
    return tiny_loaded("llama")


@pytest.fixture(scope="module")
def adapters(llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    make_adapter(llama.model, "prompt", 5, root / "prompt", seed=1)
    make_adapter(llama.model, "prefix", 4, root / "prefix", seed=2)
    return {kind: peft_files(root / kind) for kind in ("prompt", "prefix")}


@pytest.fixture
def data_dir(tmp_path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def replicas(llama, data_dir, database_url) -> Iterator[OpenReplica]:
    """Opens replicas on the test's database and data directory; closes them all at the end."""
    opened: list[Registry] = []

    def open_replica(**options) -> Registry:
        replica = open_registry(data_dir, llama, database_url=database_url, **options)
        opened.append(replica)
        return replica

    yield open_replica
    for replica in opened:
        replica.close()


def run_together(count: int, work: Callable[[int], object]) -> list[object]:
    """Run work(0..count-1) on as many threads released at once; re-raise what any raised."""
    barrier = threading.Barrier(count)

    def start(index: int) -> object:
        barrier.wait()
        return work(index)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(start, range(count)))


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """A guard against hanging, not a timing assertion: the condition must come true."""
    deadline = time.monotonic() + 60
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.01)


# The registry's flows on PostgreSQL ------------------------------------------------------------


def test_tenants_keys_and_authentication(replicas):
    registry = replicas()
    first = registry.create_tenant("alice")
    second = registry.issue_key("alice")
    assert registry.authenticate(first.api_key) == "alice"
    with pytest.raises(AlreadyExists):
        registry.create_tenant("alice")

    registry.revoke_key("alice", first.key_id)
    with pytest.raises(Unauthorized):
        registry.authenticate(first.api_key)
    other = replicas()  # another replica sees the same tenants and keys
    assert other.authenticate(second.api_key) == "alice"
    keys = {key.key_id: key.revoked for key in other.list_keys("alice")}
    assert keys == {first.key_id: True, second.key_id: False}
    assert other.get_tenant("alice").name == "alice"


def test_a_tenant_revoking_both_its_keys_at_once_on_two_replicas_keeps_one(replicas):
    fleet = [replicas(), replicas()]
    issued = [fleet[0].create_tenant("alice"), fleet[0].issue_key("alice")]

    def revoke(index: int) -> object:
        try:
            fleet[index].revoke_key("alice", issued[index].key_id, keep_one=True)
        except KeyLimit as error:
            return error
        return None

    outcomes = run_together(2, revoke)
    assert sorted(type(o).__name__ for o in outcomes) == ["KeyLimit", "NoneType"]
    assert [key.revoked for key in fleet[1].list_keys("alice")].count(False) == 1

    # Different quotas updated at once on two replicas: both changes stay.
    changes = [{"max_prefixes": 7}, {"max_bytes": 9}]
    run_together(2, lambda index: fleet[index].update_quotas("alice", **changes[index]))
    assert fleet[0].get_tenant("alice").quotas == Quotas(7, 9, None)


def test_upload_overwrite_list_delete_and_reopen(llama, adapters, replicas, data_dir):
    registry = replicas()
    registry.create_tenant("alice")
    registry.create_tenant("bob")
    prompt = registry.upload("alice", "prompt", adapters["prompt"], visibility="public")
    first = registry.upload("alice", "pirate", adapters["prefix"])
    with pytest.raises(AlreadyExists, match="overwrite"):
        registry.upload("alice", "pirate", adapters["prompt"])
    second = registry.upload("alice", "pirate", native_files(llama.spec, 3, seed=5), overwrite=True)
    assert (first.version, second.version) == (1, 2)
    assert blob_files(data_dir) == files_of(prompt) | files_of(second)  # v1's files collected

    other = replicas()
    assert other.get("alice/pirate", tenant="alice") == second
    with other.acquire("alice/prompt", tenant="bob") as handle:
        expected = llama.compile(read_upload(adapters["prompt"]), MAX_VIRTUAL_TOKENS).kv
        assert torch.equal(handle.prefix.kv, expected)
    for i in range(5):  # pages cross owners: the (owner, name) row comparison on PostgreSQL
        registry.upload("bob", f"b{i}", native_files(llama.spec, 2, seed=10 + i))
    pages, cursor = [], None
    while True:
        page = other.list_prefixes(tenant="bob", limit=2, cursor=cursor)
        pages.append([info.id for info in page.items])
        if (cursor := page.next_cursor) is None:
            break
    assert pages == [["alice/prompt", "bob/b0"], ["bob/b1", "bob/b2"], ["bob/b3", "bob/b4"]]

    registry.delete("pirate", tenant="alice")
    with pytest.raises(NotFound):
        other.get("pirate", tenant="alice")
    again = other.upload("alice", "pirate", adapters["prefix"])
    assert again.version == 3  # tombstones keep versions rising
    assert other.usage("alice").prefixes == 2


# Replicas on one database -----------------------------------------------------------------------


def test_fine_tuning_records_and_a_jobs_prefix_commit_together(llama, replicas):
    registry = replicas()
    registry.create_tenant("alice")
    tuning = Tuning(registry.database)
    content = b'{"prompt": "a", "completion": "b"}\n' * 3
    file_id = tuning.add_file("alice", "t.jsonl", "fine-tune", content, 3).id
    assert tuning.file_content("alice", file_id) == content  # BYTEA round trip
    spec = JobSpec("base", file_id, None, PrefixKind.PREFIX_TUNING, 4, Hyperparameters(1, 1, 1.0),
                   "mine", 0)  # fmt: skip
    job = tuning.create_job("alice", spec)
    assert tuning.queue(job, "validated")
    (job,) = tuning.start_queued(max_running=1, runner="r", lease_s=60)
    files = native_files(llama.spec, 4, seed=3)
    info = registry.upload("alice", "mine", files, on_commit=tuning.succeed_on_commit(job, 5))
    done = Tuning(replicas().database).get_job("alice", job.id)  # seen from another replica
    assert (done.status, done.fine_tuned_model) == (JobStatus.SUCCEEDED, info.id)
    events = [e.message for e in tuning.list_events("alice", job.id, limit=10).items]
    assert events[0] == "The job has successfully completed"


def test_a_job_whose_replica_stopped_is_taken_over_with_its_checkpoint(replicas, data_dir):
    first, second = replicas(), replicas()
    first.create_tenant("alice")
    a, b = Tuning(first.database), Tuning(second.database)
    file_id = a.add_file("alice", "t.jsonl", "fine-tune", b"{}", 1).id
    spec = JobSpec("base", file_id, None, PrefixKind.PREFIX_TUNING, 4, Hyperparameters(1, 1, 1.0),
                   "mine", 0)  # fmt: skip
    assert a.queue(a.create_job("alice", spec), "validated")
    (job,) = a.start_queued(1, runner="a", lease_s=60)
    files = CheckpointFiles(data_dir)  # the store both replicas share
    on_a, on_b = (Checkpoints(r.database, files, keep=2) for r in (first, second))
    saved = {"step": 3, "train_loss": 0.5}
    assert on_a.save(job, "a", step=3, metrics=saved, state={"step": 3}, tensors=b"three")
    assert b.take_over("b", 60, limit=1) == []  # a's lease is live
    a.renew("a", [job.id], -1)  # a's heartbeat stopped
    (taken,) = b.take_over("b", 60, limit=1)
    assert not on_a.save(job, "a", step=4, metrics={}, state={}, tensors=b"four")  # a lost it
    found = on_b.latest(taken)
    assert found is not None and (found[0].step, found[0].metrics, found[1]) == (3, saved, b"three")
    assert a.renew("a", [job.id], 60) == set() and b.renew("b", [job.id], 60) == {job.id}


def test_replicas_starting_together_on_a_new_database_migrate_once(replicas, database_url):
    fleet = run_together(4, lambda _: replicas())
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            versions = connection.execute(select(schema_version.c.version)).scalars().all()
        tables = set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert versions == [SCHEMA_VERSION]
    assert {"tenants", "api_keys", "prefixes", "schema_version"} <= tables
    key = fleet[0].create_tenant("alice")
    assert fleet[3].authenticate(key.api_key) == "alice"


@pytest.mark.parametrize("what", ["tenant", "prefix"])
def test_concurrent_creation_of_one_name_has_one_winner(llama, replicas, data_dir, what):
    fleet = [replicas(), replicas()]
    fleet[0].create_tenant("alice")

    def create(index: int) -> str:
        registry = fleet[index % 2]
        try:
            if what == "tenant":
                registry.create_tenant("carol")
            else:  # different bytes each: the losers' files must not stay behind
                registry.upload("alice", "shared", native_files(llama.spec, 2, seed=index))
        except AlreadyExists:
            return "already exists"  # any other error (IntegrityError) fails the test
        return "created"

    outcomes = run_together(6, create)
    assert sorted(outcomes) == ["already exists"] * 5 + ["created"]
    if what == "tenant":
        assert fleet[1].get_tenant("carol").name == "carol"
    else:
        winner = fleet[1].get("alice/shared", tenant="alice")
        assert winner.version == 1
        assert blob_files(data_dir) == files_of(winner)


@pytest.fixture
def lock_waiters(database_url) -> Iterator[Callable[[], int]]:
    """Counts the sessions waiting for an advisory lock in this test's database."""
    engine = create_engine(database_url)
    query = text(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
        "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    )

    def count() -> int:
        with engine.connect() as connection:
            return int(connection.execute(query).scalar_one())

    yield count
    engine.dispose()


def test_collecting_a_file_waits_for_an_identical_upload_to_commit(
    llama, replicas, data_dir, lock_waiters
):
    """One replica deletes a prefix while another's upload of the same bytes has published the
    file and written its row but not committed. Unserialised, the collection sees no live row,
    unlinks the file, and the upload then commits a live prefix whose file is gone."""
    files = native_files(llama.spec, 4, seed=7)
    deleter = replicas()
    deleter.create_tenant("alice")
    original = deleter.upload("alice", "original", files)
    deleted: list[Future[None]] = []

    with ThreadPoolExecutor(1) as background:

        def delete_during_commit(stage: UploadStage) -> None:
            if stage is not UploadStage.ROW_WRITTEN:
                return
            deleted.append(background.submit(deleter.delete, "original", tenant="alice"))
            # Commit only once the delete has run to its end or waits behind our write lock.
            wait_until(lambda: deleted[0].done() or lock_waiters() > 0, "the delete ran or waited")

        copy = replicas(on_stage=delete_during_commit).upload("alice", "copy", files)
        deleted[0].result()

    assert copy.sha256 == original.sha256
    assert blob_files(data_dir) == files_of(copy)
    with replicas().acquire("alice/copy", tenant="alice") as handle:  # read from the file
        assert handle.prefix.kv.shape[3] == 4


def test_identical_uploads_and_deletes_on_two_replicas_never_lose_a_live_file(
    llama, replicas, data_dir
):
    files = native_files(llama.spec, 4, seed=11)
    fleet = [replicas(), replicas()]
    fleet[0].create_tenant("alice")

    def churn(worker: int) -> int:
        """Upload and delete the same bytes under this worker's name; count the times its own
        live prefix had no file (others' collections of those bytes run meanwhile)."""
        registry, name, lost = fleet[worker % 2], f"w{worker}", 0
        for _ in range(12):
            info = registry.upload("alice", name, files)
            path = data_dir / "blobs" / info.sha256[:2] / f"{info.sha256}.safetensors"
            lost += not path.is_file()
            registry.delete(name, tenant="alice")
        return lost

    assert run_together(4, churn) == [0, 0, 0, 0]
    assert blob_files(data_dir) == set()  # the last delete collected the file
