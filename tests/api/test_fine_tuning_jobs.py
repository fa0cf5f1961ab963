"""Fine-tuning jobs, /v1/fine_tuning/jobs: a tenant's examples become a prefix trained on the
served model beside serving, registered and servable at once; cancellation, a restart during a
job (it resumes), its checkpoints, concurrent jobs, caps, quotas and isolation."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.models import LoadedModel, weights_digest
from server.train import PrefixTrainer
from tests.api.conftest import (
    MakeClient,
    Response,
    TenantAuth,
    app_settings,
    assert_error,
    create_tenant,
    peft_files,
    wait_for,
)
from tests.api.tuning import (
    ANSWER,
    MODEL,
    PROMPTS,
    HeldTraining,
    complete,
    create_job,
    events,
    get_job,
    jsonl,
    start_job,
    training_file,
    upload_file,
    wait_status,
    worded,
)


@pytest.fixture
def model(loaded: LoadedModel) -> LoadedModel:
    return worded(loaded)


@pytest.fixture
def client(make_client: MakeClient, model: LoadedModel) -> Iterator[TestClient]:
    with make_client(model=model) as test_client:
        yield test_client


@pytest.fixture
def alice(client: TestClient) -> TenantAuth:
    return create_tenant(client, "alice")


def test_a_job_teaches_the_answer_and_its_prefix_is_served_at_once(
    client: TestClient, alice: TenantAuth
) -> None:
    assert all(complete(client, alice, MODEL, prompt) != ANSWER for prompt in PROMPTS)
    created = start_job(client, alice, suffix="taught")
    assert created["status"] == "validating_files" and created["object"] == "fine_tuning.job"
    assert created["hyperparameters"] == {
        "n_epochs": 20, "batch_size": 3, "learning_rate_multiplier": 3.0
    }  # fmt: skip
    assert created["method"]["type"] == "prefix_tuning"
    assert created["method"]["prefix_tuning"]["num_virtual_tokens"] == 16
    job = wait_status(client, alice, created["id"])
    assert job["status"] == "succeeded", job
    assert job["fine_tuned_model"] == "alice/taught" and job["error"] is None
    assert job["trained_tokens"] > 0 and job["finished_at"] >= job["created_at"]
    for prompt in PROMPTS:
        assert complete(client, alice, "alice/taught", prompt) == ANSWER
    listed = [m["id"] for m in client.get("/v1/models", headers=alice.headers).json()["data"]]
    assert "alice/taught" in listed
    prefix = client.get("/v1/prefixes/alice/taught", headers=alice.headers).json()
    assert prefix["kind"] == "prefix_tuning" and created["id"] in prefix["description"]

    messages = [e["message"] for e in events(client, alice, created["id"])]
    assert messages[0].startswith("Created fine-tuning job")
    assert messages[-2:] == [
        "New fine-tuned model created: alice/taught",
        "The job has successfully completed",
    ]
    metrics = [e["data"] for e in events(client, alice, created["id"]) if e["type"] == "metrics"]
    assert [m["step"] for m in metrics] == list(range(1, 21))
    assert {m["total_steps"] for m in metrics} == {20}
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"] / 4
    exported = client.get("/metrics").text
    assert "prefix_server_fine_tuning_jobs_running 0.0" in exported
    training = next(
        line for line in exported.splitlines()
        if line.startswith('prefix_server_device_seconds_total{user="training"}')
    )  # fmt: skip
    assert float(training.split()[-1]) > 0


def test_prompt_tuning_and_chat_examples(client: TestClient, alice: TenantAuth) -> None:
    records = [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": ANSWER}]}
        for p in PROMPTS
    ]
    method = {"type": "prompt_tuning", "prompt_tuning": {"num_virtual_tokens": 4}}
    response = create_job(
        client, alice, training_file(client, alice, records), method=method, suffix="chatty",
        seed=0,
        hyperparameters={"n_epochs": 30, "batch_size": 3, "learning_rate_multiplier": 5},
    )  # fmt: skip
    assert response.status_code == 200, response.text
    job = wait_status(client, alice, response.json()["id"])
    assert job["status"] == "succeeded", job
    prefix = client.get("/v1/prefixes/alice/chatty", headers=alice.headers).json()
    assert (prefix["kind"], prefix["num_virtual_tokens"]) == ("prompt_tuning", 4)
    body = {
        "model": "alice/chatty",
        "messages": [{"role": "user", "content": PROMPTS[0]}],
        "max_tokens": 3,
        "temperature": 0,
    }
    reply = client.post("/v1/chat/completions", json=body, headers=alice.headers).json()
    assert reply["choices"][0]["message"]["content"].strip() == ANSWER


def test_validation_loss_is_reported_every_epoch(client: TestClient, alice: TenantAuth) -> None:
    validation = training_file(client, alice)
    job = start_job(
        client, alice, validation_file=validation,
        hyperparameters={"n_epochs": 3, "batch_size": 2, "learning_rate_multiplier": 3},
    )  # fmt: skip
    assert wait_status(client, alice, job["id"])["status"] == "succeeded"
    metrics = [e["data"] for e in events(client, alice, job["id"]) if e["type"] == "metrics"]
    assert [m["step"] for m in metrics if "valid_loss" in m] == [2, 4, 6]  # 2 steps an epoch
    losses = [m["valid_loss"] for m in metrics if "valid_loss" in m]
    assert losses[-1] < losses[0]


def test_serving_is_unchanged_while_and_after_a_job_trains(
    client: TestClient,
    alice: TenantAuth,
    upload_adapter_to: Any,
    model: LoadedModel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    upload_adapter_to(client, alice, "style")
    digest = weights_digest(model.model)
    parameters = {name: p.data_ptr() for name, p in model.model.named_parameters()}
    before = {m: complete(client, alice, m, "w5 w6 w7", 8) for m in (MODEL, "alice/style")}

    held = HeldTraining(monkeypatch)
    job = start_job(client, alice, suffix="taught")
    held.wait()  # training for real, in turns with the engine, until released
    assert get_job(client, alice, job["id"])["status"] == "running"
    for _ in range(3):
        assert {m: complete(client, alice, m, "w5 w6 w7", 8) for m in before} == before
    trainer = held.trainers[0]
    assert trainer.model.base_model is model.model  # PEFT wrapped the served model: no copy
    assert not any(p.requires_grad for p in model.model.parameters())
    held.release()

    assert wait_status(client, alice, job["id"])["status"] == "succeeded"
    assert {m: complete(client, alice, m, "w5 w6 w7", 8) for m in before} == before
    assert weights_digest(model.model) == digest
    assert {name: p.data_ptr() for name, p in model.model.named_parameters()} == parameters
    assert not model.model.training


@pytest.fixture
def upload_adapter_to(adapters: dict[str, Path]) -> Any:
    def send(client: TestClient, who: TenantAuth, name: str, kind: str = "prefix", **data: str):
        response = client.post(
            "/v1/prefixes",
            data={"name": name, **data},
            files=peft_files(adapters[kind]),
            headers=who.headers,
        )
        assert response.status_code == 201, response.text
        return response.json()

    return send


def test_training_starts_from_a_prefix_the_tenant_may_use(
    client: TestClient, alice: TenantAuth, upload_adapter_to: Any
) -> None:
    bob = create_tenant(client, "bob")
    upload_adapter_to(client, alice, "style")
    upload_adapter_to(client, bob, "shared", visibility="public")
    upload_adapter_to(client, bob, "secret")
    # A tiny step from the source: the new prefix still answers as the source does.
    tiny = {"n_epochs": 1, "batch_size": 3, "learning_rate_multiplier": 1e-6}
    for source, suffix in (("style", "from-own"), ("bob/shared", "from-public")):
        job = start_job(client, alice, model=source, suffix=suffix, hyperparameters=tiny)
        assert job["method"]["prefix_tuning"]["num_virtual_tokens"] == 4  # the source's length
        assert wait_status(client, alice, job["id"])["status"] == "succeeded"
        reference = source if "/" in source else f"alice/{source}"
        assert complete(client, alice, f"alice/{suffix}", "w5 w6", 6) == complete(
            client, alice, reference, "w5 w6", 6
        )
    file_id = training_file(client, alice)
    assert_error(create_job(client, alice, file_id, model="bob/secret"), 404, "bob/secret")
    assert_error(create_job(client, alice, file_id, model="nobody/x"), 404)
    # Keys and values cannot start input embeddings (tests/api/test_transfer.py: every pair).
    prompt_method = {"type": "prompt_tuning"}
    assert_error(
        create_job(client, alice, file_id, model="style", method=prompt_method),
        400, "prefix_tuning", "prompt_tuning",
    )  # fmt: skip
    method = {"type": "prefix_tuning", "prefix_tuning": {"num_virtual_tokens": 8}}
    error = assert_error(
        create_job(client, alice, file_id, model="style", method=method), 400, "expected 4"
    )
    assert error["field"] == "method.num_virtual_tokens"


# Cancellation and restart -----------------------------------------------------------------


def test_cancelling_a_running_job_stops_it_and_registers_nothing(
    client: TestClient, alice: TenantAuth, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = HeldTraining(monkeypatch)
    job = start_job(client, alice, suffix="taught")
    held.wait()
    cancelled = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=alice.headers)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    worker = client.app.state.services.worker  # type: ignore[attr-defined]
    wait_for(lambda: worker.num_running == 0, "the job's thread to stop")
    assert get_job(client, alice, job["id"])["status"] == "cancelled"
    assert_error(client.get("/v1/prefixes/alice/taught", headers=alice.headers), 404)
    assert "Job cancelled" in [e["message"] for e in events(client, alice, job["id"])]
    again = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=alice.headers)
    assert_error(again, 409, "already been cancelled")
    held.release()
    # the name is free again
    assert (
        wait_status(client, alice, start_job(client, alice, suffix="taught")["id"])["status"]
        == "succeeded"
    )
    finished = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=alice.headers)
    assert_error(finished, 409)


def test_cancelling_a_queued_job(make_client: MakeClient, model: LoadedModel) -> None:
    with make_client(model=model, max_running_jobs=0) as client:
        alice = create_tenant(client, "alice")
        job = start_job(client, alice)
        assert wait_status(client, alice, job["id"], {"queued"})["status"] == "queued"
        cancelled = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=alice.headers)
        assert cancelled.json()["status"] == "cancelled"
        assert get_job(client, alice, job["id"])["finished_at"] is not None


class HeldAfterSteps:
    """Lets every job take `steps` optimiser steps, then holds it before the next one, taking
    turns on the device (so a stop or a cancel reaches it) but training nothing more."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, steps: int) -> None:
        self.holding = threading.Event()
        self._taken = 0
        real = PrefixTrainer.step
        stopped = threading.Event()  # never set: the turn itself says when the job stopped

        def held(trainer: PrefixTrainer, batch: list[Any], turn: Any, **options: Any) -> float:
            if self._taken < steps:
                self._taken += 1
                return real(trainer, batch, turn, **options)
            self.holding.set()
            while True:  # until the turn raises: the job was stopped or cancelled
                with turn():
                    pass
                stopped.wait(0.005)  # polls the job's own check, without spinning a core

        monkeypatch.setattr(PrefixTrainer, "step", held)

    def wait(self) -> None:
        assert self.holding.wait(60), "no job took its steps"


def metrics(client: TestClient, who: TenantAuth, job_id: str) -> dict[int, float]:
    """train_loss by step (a step trained again after a resume: the last time)."""
    found = [e["data"] for e in events(client, who, job_id) if e["type"] == "metrics"]
    return {data["step"]: data["train_loss"] for data in found}


def test_a_restart_resumes_the_running_job_and_runs_the_queued_ones(
    tmp_path: Path, model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = app_settings(tmp_path / "data", max_running_jobs=1)
    held = HeldAfterSteps(monkeypatch, steps=2)
    with TestClient(create_app(settings, loaded=model, background_start=False)) as client:
        alice = create_tenant(client, "alice")
        running = start_job(client, alice, suffix="first")
        held.wait()
        queued = start_job(client, alice, suffix="second")
        assert wait_status(client, alice, queued["id"], {"queued"})["status"] == "queued"
    # The server stopped after the job's second step. A clean stop checkpoints it (no periodic
    # checkpoint was due) and releases its lease: the next start takes it over at once.
    monkeypatch.undo()
    with TestClient(create_app(settings, loaded=model, background_start=False)) as client:
        resumed = wait_status(client, alice, running["id"])
        assert resumed["status"] == "succeeded", resumed
        messages = [event["message"] for event in events(client, alice, running["id"])]
        assert "Training resumes from the checkpoint at step 2" in messages, messages
        assert wait_status(client, alice, queued["id"])["status"] == "succeeded"
        # The queued job is the same job never interrupted: the same loss at every step (no
        # request was served meanwhile, which would split batches into micro-batches).
        assert metrics(client, alice, running["id"]) == metrics(client, alice, queued["id"])
        assert complete(client, alice, "alice/first", PROMPTS[0]) == ANSWER


def checkpoints(client: TestClient, who: TenantAuth, job_id: str, **params: Any) -> Response:
    return client.get(
        f"/v1/fine_tuning/jobs/{job_id}/checkpoints", params=params, headers=who.headers
    )


def test_a_jobs_checkpoints_are_listed_with_their_step_and_metrics(
    make_client: MakeClient, model: LoadedModel
) -> None:
    with make_client(model=model, checkpoint_interval=0, checkpoints_per_job=2) as client:
        alice, bob = create_tenant(client, "alice"), create_tenant(client, "bob")
        job = wait_status(client, alice, start_job(client, alice, suffix="taught")["id"])
        assert job["status"] == "succeeded"
        steps = {
            e["data"]["step"]: e["data"]
            for e in events(client, alice, job["id"])
            if e["type"] == "metrics"
        }
        total = max(steps)
        listed = checkpoints(client, alice, job["id"])
        assert listed.status_code == 200, listed.text
        body = listed.json()
        # The newest two of a checkpoint after every step but the last (which registers).
        assert [c["step_number"] for c in body["data"]] == [total - 1, total - 2]
        assert not body["has_more"] and body["object"] == "list"
        newest = body["data"][0]
        assert set(newest) == {
            "id", "object", "created_at", "fine_tuned_model_checkpoint", "fine_tuning_job_id",
            "metrics", "step_number",
        }  # fmt: skip
        assert newest["object"] == "fine_tuning.job.checkpoint"
        assert newest["fine_tuning_job_id"] == job["id"]
        assert newest["metrics"]["train_loss"] == steps[total - 1]["train_loss"]
        assert newest["fine_tuned_model_checkpoint"] == f"alice/taught:ckpt-step-{total - 1}"
        assert (body["first_id"], body["last_id"]) == (newest["id"], body["data"][1]["id"])
        page = checkpoints(client, alice, job["id"], limit=1, after=newest["id"]).json()
        assert [c["step_number"] for c in page["data"]] == [total - 2] and not page["has_more"]
        # The job ended: its training state is dropped, its steps stay listed.
        store = client.app.state.services.settings.prefix_store  # type: ignore[attr-defined]
        folder = store / "checkpoints" / job["id"]
        wait_for(lambda: not folder.exists(), "the ended job's checkpoint files to go")
        # Bad input: a clear 4xx; another tenant's job reads exactly as a missing one.
        foreign = assert_error(checkpoints(client, bob, job["id"]), 404)
        missing = assert_error(checkpoints(client, bob, "ftjob-" + "0" * 24), 404)
        assert foreign["message"].replace(job["id"], "ID") == missing["message"].replace(
            "ftjob-" + "0" * 24, "ID"
        )
        assert_error(checkpoints(client, alice, job["id"], after="ftevent-1"), 400, "after")
        # numbers no checkpoint can have: not ASCII digits ("²" is a digit to Python), beyond
        # what the database's integer holds
        for number in ("²", "٣", "9" * 20, str(2**31)):
            response = checkpoints(client, alice, job["id"], after=f"ftckpt-{number}")
            assert_error(response, 400, "after")
            listed = client.get(
                f"/v1/fine_tuning/jobs/{job['id']}/events",
                params={"after": f"ftevent-{number}"},
                headers=alice.headers,
            )
            assert_error(listed, 400, "after")
        assert checkpoints(client, alice, job["id"], limit=0).status_code == 422
        assert checkpoints(client, alice, job["id"], limit=101).status_code == 422


# Concurrency, caps, quotas, isolation -------------------------------------------------------


def test_two_tenants_train_at_once_and_a_tenants_second_job_queues(
    client: TestClient, alice: TenantAuth, monkeypatch: pytest.MonkeyPatch
) -> None:
    bob = create_tenant(client, "bob")
    held = HeldTraining(monkeypatch)
    alice_job = start_job(client, alice, suffix="mine")
    bob_job = start_job(client, bob, suffix="mine")
    for who, job in ((alice, alice_job), (bob, bob_job)):
        wait_status(client, who, job["id"], {"running"})
    alice_second = start_job(client, alice, suffix="later")
    assert wait_status(client, alice, alice_second["id"], {"queued"})["status"] == "queued"
    assert get_job(client, alice, alice_job["id"])["status"] == "running"
    held.release()
    for who, job in ((alice, alice_job), (bob, bob_job), (alice, alice_second)):
        finished = wait_status(client, who, job["id"])
        assert finished["status"] == "succeeded", finished
        assert finished["fine_tuned_model"].startswith(f"{who.name}/")
    for who in (alice, bob):
        assert complete(client, who, f"{who.name}/mine", PROMPTS[1]) == ANSWER


def test_the_global_cap_queues_another_tenants_job(
    make_client: MakeClient, model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = HeldTraining(monkeypatch)
    with make_client(model=model, max_running_jobs=1) as client:
        alice, bob = create_tenant(client, "alice"), create_tenant(client, "bob")
        first = start_job(client, alice)
        held.wait()
        second = start_job(client, bob)
        assert wait_status(client, bob, second["id"], {"queued"})["status"] == "queued"
        held.release()
        assert wait_status(client, bob, second["id"])["status"] == "succeeded"
        assert wait_status(client, alice, first["id"])["status"] == "succeeded"


def test_another_tenants_jobs_are_404(client: TestClient, alice: TenantAuth) -> None:
    bob = create_tenant(client, "bob")
    job = start_job(client, alice, suffix="taught")
    wait_status(client, alice, job["id"])
    for method, path in [
        ("GET", f"/v1/fine_tuning/jobs/{job['id']}"),
        ("GET", f"/v1/fine_tuning/jobs/{job['id']}/events"),
        ("POST", f"/v1/fine_tuning/jobs/{job['id']}/cancel"),
    ]:
        assert_error(client.request(method, path, headers=bob.headers), 404, job["id"])
    assert client.get("/v1/fine_tuning/jobs", headers=bob.headers).json()["data"] == []
    # nor may bob train on alice's file or use the prefix her job made
    assert_error(create_job(client, bob, job["training_file"]), 404, job["training_file"])
    body = {"model": "alice/taught", "prompt": "w1", "max_tokens": 1}
    assert_error(client.post("/v1/completions", json=body, headers=bob.headers), 404)


def test_jobs_are_listed_newest_first_in_pages(client: TestClient, alice: TenantAuth) -> None:
    file_id = training_file(client, alice)
    ids = [create_job(client, alice, file_id).json()["id"] for _ in range(3)]
    page = client.get("/v1/fine_tuning/jobs", params={"limit": 2}, headers=alice.headers).json()
    assert [j["id"] for j in page["data"]] == ids[:0:-1] and page["has_more"] is True
    rest = client.get(
        "/v1/fine_tuning/jobs", params={"after": ids[1]}, headers=alice.headers
    ).json()
    assert [j["id"] for j in rest["data"]] == [ids[0]] and rest["has_more"] is False
    for job_id in ids:
        wait_status(client, alice, job_id)
    # a file is kept while a job needs it, and may go once none does
    response = client.delete(f"/v1/files/{file_id}", headers=alice.headers)
    assert response.status_code == 200, response.text


def test_a_file_a_job_still_needs_cannot_be_deleted(
    make_client: MakeClient, model: LoadedModel
) -> None:
    with make_client(model=model, max_running_jobs=0) as client:
        alice = create_tenant(client, "alice")
        job = start_job(client, alice)
        response = client.delete(f"/v1/files/{job['training_file']}", headers=alice.headers)
        assert_error(response, 409, job["id"], "cancel")


def test_quotas_and_caps_on_jobs(make_client: MakeClient, model: LoadedModel) -> None:
    with make_client(
        model=model, max_running_jobs=0, max_jobs_per_tenant=1, max_training_steps=50
    ) as client:
        alice = create_tenant(client, "alice")
        file_id = training_file(client, alice)
        assert create_job(client, alice, file_id).status_code == 200
        error = assert_error(create_job(client, alice, file_id), 422, "max_active_jobs")
        assert (error["type"], error["limit"]) == ("quota_exceeded", 1)
        bob = create_tenant(client, "bob")
        bob_file = training_file(client, bob)
        too_long = {"n_epochs": 50, "batch_size": 1}
        error = assert_error(
            create_job(client, bob, bob_file, hyperparameters=too_long), 400, "150 steps", "50"
        )
        assert error["field"] == "hyperparameters.n_epochs"
        admin = {"Authorization": "Bearer admin-secret"}
        assert (
            client.patch("/v1/tenants/bob", json={"max_prefixes": 0}, headers=admin).status_code
            == 200
        )
        assert_error(create_job(client, bob, bob_file), 422, "max_prefixes")
        assert client.patch(
            "/v1/tenants/bob", json={"max_prefixes": None, "max_virtual_tokens": 8},
            headers=admin,
        ).status_code == 200  # fmt: skip
        assert_error(create_job(client, bob, bob_file), 422, "max_virtual_tokens")


def test_the_prefix_name_is_checked_when_the_job_is_created(
    client: TestClient, alice: TenantAuth, upload_adapter_to: Any
) -> None:
    upload_adapter_to(client, alice, "taken")
    file_id = training_file(client, alice)
    assert_error(create_job(client, alice, file_id, suffix="taken"), 409, "alice/taken")
    error = assert_error(create_job(client, alice, file_id, suffix="Not A Name"), 400, "suffix")
    assert error["field"] == "suffix"
    assert create_job(client, alice, file_id, suffix="once").status_code == 200
    # an active job already makes alice/once, or has made it by now
    assert_error(create_job(client, alice, file_id, suffix="once"), 409, "alice/once")
    default = create_job(client, alice, file_id).json()
    assert default["user_provided_suffix"].startswith("ft-")
    job = wait_status(client, alice, default["id"])
    assert job["fine_tuned_model"] == f"alice/{default['user_provided_suffix']}"


REFUSED: list[tuple[dict[str, Any], int, tuple[str, ...]]] = [
    ({"integrations": []}, 400, ("integrations", "not supported")),
    ({"hyperparameters": {"n_epochs": 0}}, 422, ("n_epochs",)),
    ({"hyperparameters": {"n_epochs": "many"}}, 422, ("n_epochs",)),
    ({"hyperparameters": {"batch_size": 65}}, 422, ("batch_size",)),
    ({"hyperparameters": {"learning_rate_multiplier": 0}}, 422, ("learning_rate_multiplier",)),
    ({"hyperparameters": {"warmup": 1}}, 422, ("warmup",)),
    ({"method": {"type": "dpo"}}, 422, ("method.type",)),
    ({"method": {"type": "prefix_tuning", "prompt_tuning": {}}}, 422, ("another method",)),
    (
        {"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}}},
        400,
        ("hyperparameters", "not both"),
    ),
    ({"seed": -1}, 422, ("seed",)),
    ({"seed": 2**31}, 422, ("seed",)),
    ({"suffix": "x" * 65}, 422, ("suffix",)),
    ({"model": "tiny-words", "training_file": "file-nope"}, 404, ("file-nope",)),
    ({"validation_file": "file-nope"}, 404, ("file-nope",)),
    (
        {"method": {"type": "prefix_tuning", "prefix_tuning": {"num_virtual_tokens": 300}}},
        400,
        ("num_virtual_tokens", "256"),
    ),
]


@pytest.mark.parametrize(("fields", "status", "words"), REFUSED)
def test_a_bad_job_is_refused_naming_the_field(
    client: TestClient,
    alice: TenantAuth,
    fields: dict[str, Any],
    status: int,
    words: tuple[str, ...],
) -> None:
    file_id = training_file(client, alice)
    assert_error(create_job(client, alice, file_id, **fields), status, *words)
    assert client.get("/v1/fine_tuning/jobs", headers=alice.headers).json()["data"] == []


def test_files_the_model_cannot_train_on_fail_the_job_naming_the_line(
    make_client: MakeClient, loaded: LoadedModel
) -> None:
    chat = {"messages": [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"}]}
    long = {"prompt": " ".join(["w5"] * 120), "completion": "w6"}
    with make_client(model=worded(loaded, chat=False)) as client:
        alice = create_tenant(client, "alice")
        for records, line, words in [
            ([{"prompt": "w1", "completion": "w2"}, chat], 2, "chat template"),
            ([long], 1, "121 tokens, expected at most 112"),  # --max-len 128, 16 virtual tokens
        ]:
            job = create_job(client, alice, training_file(client, alice, records)).json()
            failed = wait_status(client, alice, job["id"])
            assert failed["status"] == "failed", failed
            error = failed["error"]
            assert error["code"] == "invalid_training_file"
            assert error["param"] == "training_file"
            assert f"line {line}" in error["message"] and words in error["message"]


def test_a_diverging_job_fails_and_registers_nothing(
    client: TestClient, alice: TenantAuth, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(PrefixTrainer, "step", lambda *args, **kwargs: float("nan"))
    job = wait_status(client, alice, start_job(client, alice, suffix="broken")["id"])
    assert job["status"] == "failed" and job["error"]["code"] == "training_diverged"
    assert (
        "step 1" in job["error"]["message"]
        and "learning_rate_multiplier" in job["error"]["message"]
    )
    assert events(client, alice, job["id"])[-1]["level"] == "error"
    assert_error(client.get("/v1/prefixes/alice/broken", headers=alice.headers), 404)


def test_a_model_without_a_tokenizer_refuses_jobs(make_client: MakeClient) -> None:
    with make_client() as plain:
        alice = create_tenant(plain, "alice")
        file_id = upload_file(plain, alice, jsonl([{"prompt": "a", "completion": "b"}])).json()[
            "id"
        ]
        body = {"model": "tiny-llama", "training_file": file_id}
        response = plain.post("/v1/fine_tuning/jobs", json=body, headers=alice.headers)
        assert_error(response, 400, "tokenizer")


def test_a_suffix_that_names_an_existing_prefix_says_what_a_job_can_do(
    client: TestClient, alice: TenantAuth, adapters: dict[str, Path]
) -> None:
    from tests.api.conftest import upload

    assert upload(client, alice, peft_files(adapters["prefix"]), name="pirate").status_code == 201
    refused = create_job(client, alice, training_file(client, alice), suffix="pirate")
    error = assert_error(refused, 409, "alice/pirate", "choose another suffix")
    assert error["field"] == "suffix" and "overwrite" not in error["message"]
