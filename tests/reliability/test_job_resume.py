"""Fine-tuning jobs outlive their server: real `prefix-server serve` processes killed with
SIGKILL in the middle of a job.

- Restart: the server is killed mid-job and started again on the same data; the job resumes
  from its last checkpoint and finishes, and its per-step losses equal, exactly, those of an
  uninterrupted job of the same seed on the same files (and its prefix answers the same).
- Replicas: two server processes share one SQLite database and one store directory (one
  machine; across machines, PostgreSQL and a shared filesystem work the same way); the one
  holding the job (its lease names its pid) is killed, and the other takes the job over when
  the lease expires and finishes it.

Jobs checkpoint after every step here (`checkpoint_interval=0`) and leases last 2 s, so a takeover
comes within seconds; the job is long enough (120 steps) that the kill lands in the middle.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from tests.e2e.test_server_process import start_server
from tests.reliability.common import (
    Live,
    Server,
    World,
    bearer,
    build_world,
    live_server,
    wait_until,
)

SETTINGS: dict[str, object] = {"checkpoint_interval": 0, "job_lease": 2, "file_grace": 60}
EXAMPLES = [{"prompt": f"w{i} w{i + 1}", "completion": f" w{i + 40} w{i + 41}"} for i in range(12)]
HYPERPARAMETERS = {"n_epochs": 10, "batch_size": 1, "learning_rate_multiplier": 1}  # 120 steps
SEED = 7
DEADLINE = 180  # seconds: generous for a loaded 2-core machine


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("resume"))


@pytest.fixture(scope="module", autouse=True)
def settings_in_environment() -> Iterator[None]:
    """Every server of this module runs with SETTINGS (as PREFIX_SERVER_* variables, which
    `prefix-server serve` reads for the flags it was not given)."""
    variables = {f"PREFIX_SERVER_{k.upper()}": str(v) for k, v in SETTINGS.items()}
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    yield
    for name, value in saved.items():
        if value is None:
            del os.environ[name]
        else:
            os.environ[name] = value


@contextmanager
def stopped_at_exit(server: Server) -> Iterator[Server]:
    try:
        yield server
    finally:
        if server.process.poll() is None:
            server.stop()


class Tenant:
    def __init__(self, url: str, key: str) -> None:
        self.url, self.key, self.headers = url, key, bearer(key)

    def get(self, path: str, **params: Any) -> Any:
        response = httpx.get(f"{self.url}{path}", params=params, headers=self.headers, timeout=30)
        assert response.status_code == 200, response.text
        return response.json()

    def post(self, path: str, body: dict[str, Any]) -> Any:
        response = httpx.post(f"{self.url}{path}", json=body, headers=self.headers, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()

    def create_job(self, suffix: str) -> str:
        content = "\n".join(json.dumps(example) for example in EXAMPLES).encode()
        uploaded = httpx.post(
            f"{self.url}/v1/files",
            files={"file": ("train.jsonl", content)},
            data={"purpose": "fine-tune"},
            headers=self.headers,
            timeout=30,
        )
        assert uploaded.status_code == 200, uploaded.text
        model = self.get("/v1/models")["data"][0]["id"]
        body = {
            "model": model, "training_file": uploaded.json()["id"], "seed": SEED,
            "hyperparameters": HYPERPARAMETERS, "suffix": suffix,
        }  # fmt: skip
        return str(self.post("/v1/fine_tuning/jobs", body)["id"])

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self.get(f"/v1/fine_tuning/jobs/{job_id}"))

    def events(self, job_id: str) -> list[dict[str, Any]]:
        """Oldest first."""
        return list(reversed(self.get(f"/v1/fine_tuning/jobs/{job_id}/events", limit=1000)["data"]))

    def checkpointed_step(self, job_id: str) -> int:
        listed = self.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", limit=1)["data"]
        return int(listed[0]["step_number"]) if listed else 0

    def finished(self, job_id: str) -> dict[str, Any]:
        found: dict[str, Any] = {}

        def ended() -> bool:
            found.update(self.job(job_id))
            return found["status"] in ("succeeded", "failed", "cancelled")

        wait_until(ended, DEADLINE, lambda: f"job {job_id}: {found.get('status')}")
        return found

    def answer(self, model: str) -> str:
        body = {"model": model, "prompt": "w3 w4", "max_tokens": 4, "temperature": 0}
        return str(self.post("/v1/completions", body)["choices"][0]["text"])


def losses(events: list[dict[str, Any]]) -> dict[int, float]:
    """train_loss by step. A resumed job trains the steps after its checkpoint again: each
    time, the loss must be the same."""
    found: dict[int, float] = {}
    for event in events:
        if event["type"] == "metrics":
            step, loss = event["data"]["step"], event["data"]["train_loss"]
            assert found.setdefault(step, loss) == loss, (step, found[step], loss)
    return found


def resumed_at(events: list[dict[str, Any]]) -> int:
    (message,) = [e["message"] for e in events if "resumes from the checkpoint" in e["message"]]
    return int(message.rsplit(" ", 1)[1])


def kill_mid_job(server: Server, alice: Tenant, job_id: str) -> None:
    """SIGKILL once the job has checkpointed a few steps, with most of it still to train."""
    wait_until(
        lambda: alice.checkpointed_step(job_id) >= 5,
        DEADLINE,
        lambda: f"job {job_id} to checkpoint step 5: {alice.job(job_id)['status']}",
    )
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(timeout=30)


def lease_pid(world: World, job_id: str) -> int:
    """The pid of the process whose runner holds the job (`host:pid:random`)."""
    with sqlite3.connect(world.data_dir / "registry.sqlite3") as database:
        (owner,) = database.execute(
            "SELECT lease_owner FROM tuning_jobs WHERE id = ?", (job_id,)
        ).fetchone()
    return int(owner.split(":")[-2])


def test_a_job_killed_with_its_server_resumes_after_the_restart_with_the_same_losses(
    world: World,
) -> None:
    log = world.data_dir.parent / "restart.log"
    with live_server(world, log, **SETTINGS) as live:
        alice = Tenant(live.url, live.keys["alice"])
        job_id = alice.create_job("resumed")
        kill_mid_job(live.server, alice, job_id)
    with stopped_at_exit(start_server(world.model_dir, world.data_dir, log)) as server:
        alice = Tenant(server.url, alice.key)
        job = alice.finished(job_id)
        assert job["status"] == "succeeded", job
        events = alice.events(job_id)
        resumed = losses(events)
        total = len(EXAMPLES) * HYPERPARAMETERS["n_epochs"]
        assert 5 <= resumed_at(events) < total - 1  # killed in the middle
        # The same job never interrupted, on the same server: the same loss at every step.
        baseline_id = alice.create_job("uninterrupted")
        assert alice.finished(baseline_id)["status"] == "succeeded"
        baseline = losses(alice.events(baseline_id))
        assert sorted(resumed) == list(range(1, total + 1))
        assert resumed == baseline
        assert job["trained_tokens"] == alice.job(baseline_id)["trained_tokens"]
        assert alice.answer("alice/resumed") == alice.answer("alice/uninterrupted")


def test_a_replica_killed_mid_job_leaves_it_to_the_other(world: World) -> None:
    log = world.data_dir.parent / "replicas.log"
    world = World(world.model_dir, world.data_dir.parent / "shared", world.loaded, world.adapters)
    with ThreadPoolExecutor(1) as pool:  # the two replicas start together
        other_log = log.with_name("replicas-second.log")
        starting = pool.submit(start_server, world.model_dir, world.data_dir, other_log)
        try:
            with (
                live_server(world, log, **SETTINGS) as first,
                stopped_at_exit(starting.result()) as second,
            ):
                replicas_share_a_job(world, first, second)
        finally:  # the second replica, even when the first failed to start
            process = starting.result().process
            if process.poll() is None:
                process.kill()
                process.wait()


def replicas_share_a_job(world: World, first: Live, second: Server) -> None:
    """Both replicas run jobs: whichever starts this one holds its lease."""
    alice = Tenant(first.url, first.keys["alice"])
    job_id = alice.create_job("taken-over")
    wait_until(lambda: alice.job(job_id)["status"] == "running", DEADLINE, lambda: "start")
    holder, other = (
        (first.server, second) if lease_pid(world, job_id) == first.pid else (second, first.server)
    )
    kill_mid_job(holder, alice, job_id)
    survivor = Tenant(other.url, first.keys["alice"])
    job = survivor.finished(job_id)
    assert job["status"] == "succeeded", job
    assert lease_pid(world, job_id) == other.process.pid
    events = survivor.events(job_id)
    assert resumed_at(events) >= 5
    total = len(EXAMPLES) * HYPERPARAMETERS["n_epochs"]
    assert sorted(losses(events)) == list(range(1, total + 1))
    assert survivor.answer("alice/taken-over")  # its prefix is served
