"""Prompt transfer from any kind: a fine-tuning job's `model` may be any prefix the tenant may
use. Before its first step the new prefix answers exactly as its source (same kind: from its
parameters; a soft prompt into prefix tuning: from its compiled keys and values; P-tuning into
prompt tuning: from its encoder's output embeddings); an impossible pair or another length is
a 400 naming both."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from prefixes import PrefixKind, read_upload
from server.models import LoadedModel
from server.train import PrefixTrainer, TrainConfig
from server.tuning.errors import SourceChanged
from server.tuning.transfer import initial_values
from tests.api.conftest import (
    NUM_VIRTUAL_TOKENS,
    NewTenant,
    TenantAuth,
    Upload,
    assert_error,
    create_tenant,
    peft_files,
    upload,
)
from tests.api.tuning import create_job, training_file, wait_status, worded

PROMPT = [5, 17, 200, 33, 9]
NEW_TOKENS = 8
# (the source's PEFT kind, the job's method): every pair a job may train.
PAIRS = [
    ("prompt", "prefix_tuning"),
    ("p_tuning", "prefix_tuning"),
    ("prefix", "prefix_tuning"),
    ("prefix_projection", "prefix_tuning"),
    ("prompt", "prompt_tuning"),
    ("p_tuning", "prompt_tuning"),
]


@pytest.fixture
def model(loaded: LoadedModel) -> LoadedModel:
    return worded(loaded)  # fine-tuning needs a tokenizer


@pytest.fixture
def client(make_client: Any, model: LoadedModel) -> Any:
    with make_client(model=model) as test_client:
        yield test_client


def served_tokens(client: TestClient, who: TenantAuth, ref: str) -> list[int]:
    body = {"prompt": PROMPT, "prefix": ref, "max_new_tokens": NEW_TOKENS, "temperature": 0}
    response = client.post("/v1/generate", json=body, headers=who.headers)
    assert response.status_code == 200, response.text
    return list(response.json()["token_ids"])


def step_zero(model: LoadedModel, method: str, init: Any) -> dict[str, bytes]:
    """What a job of `method` starting from `init` would register before its first step."""
    kind = "prefix" if method == "prefix_tuning" else "prompt"
    config = TrainConfig(kind=kind, virtual_tokens=init.num_virtual_tokens, steps=0)
    trainer = PrefixTrainer(model, config, init_from=init)
    try:
        return trainer.adapter_files()
    finally:
        trainer.close()


@pytest.mark.parametrize(("source_kind", "method"), PAIRS)
def test_a_transfer_answers_exactly_as_its_source_before_the_first_step(
    client: TestClient,
    tenant: TenantAuth,
    upload_adapter: Upload,
    adapters: dict[str, Path],
    model: LoadedModel,
    source_kind: str,
    method: str,
) -> None:
    upload_adapter(tenant, "source", source_kind)
    registry = client.app.state.services.registry  # type: ignore[attr-defined]
    source = registry.resolve("source", tenant="alice")
    init = initial_values(source, PrefixKind(method), registry, "alice")
    if method == "prompt_tuning":  # the embeddings themselves: P-tuning's encoder output
        assert init.kind is PrefixKind.PROMPT_TUNING
        folder = adapters[source_kind]
        uploaded = read_upload({path.name: path.read_bytes() for path in folder.iterdir()})
        assert init.tensor.equal(uploaded.tensor)

    files = step_zero(model, method, init)
    sent = [("files", (name, data)) for name, data in files.items()]
    started = upload(client, tenant, sent, name="started")
    assert started.status_code == 201, started.text
    assert started.json()["kind"] == method
    assert started.json()["num_virtual_tokens"] == NUM_VIRTUAL_TOKENS[source_kind]
    assert served_tokens(client, tenant, "alice/started") == served_tokens(
        client, tenant, "alice/source"
    )


def test_an_impossible_pair_or_another_length_is_a_400_naming_both(
    client: TestClient, new_tenant: NewTenant, upload_adapter: Upload
) -> None:
    alice, bob = new_tenant("alice"), new_tenant("bob")
    upload_adapter(alice, "keys", "prefix")
    upload_adapter(alice, "soft", "p_tuning")
    upload_adapter(bob, "secret", "prompt")
    file_id = training_file(client, alice)

    prompt_method = {"type": "prompt_tuning"}
    error = assert_error(
        create_job(client, alice, file_id, model="keys", method=prompt_method),
        400, "alice/keys", "prefix_tuning", "prompt_tuning",
    )  # fmt: skip
    assert error["field"] == "model"
    length = NUM_VIRTUAL_TOKENS["p_tuning"]
    longer = {"type": "prompt_tuning", "prompt_tuning": {"num_virtual_tokens": length + 1}}
    error = assert_error(
        create_job(client, alice, file_id, model="soft", method=longer),
        400, f"expected {length}", f"found {length + 1}", "alice/soft", "p_tuning",
    )  # fmt: skip
    assert error["field"] == "method.num_virtual_tokens"
    assert_error(create_job(client, alice, file_id, model="bob/secret"), 404, "bob/secret")

    # Nothing was created, and the sources serve as before.
    listed = client.get("/v1/fine_tuning/jobs", headers=alice.headers)
    assert listed.status_code == 200 and listed.json()["data"] == []
    assert served_tokens(client, alice, "alice/keys")
    assert served_tokens(client, bob, "bob/secret")


def test_a_source_replaced_before_the_job_starts_fails_it_naming_both(
    make_client: Any, model: LoadedModel, adapters: dict[str, Path]
) -> None:
    """Jobs wait queued (no job may run) while their source is overwritten by a version of
    another kind and length: each fails as `source_changed` naming the source's new version and
    the job's method and length, never as an internal error; the source serves its new self."""
    with make_client(model=model, max_running_jobs=0) as client:
        alice = create_tenant(client, "alice")
        sent = upload(client, alice, peft_files(adapters["prompt"]), name="soft")
        assert sent.status_code == 201, sent.text
        file_id = training_file(client, alice)
        prompt_method = {"type": "prompt_tuning"}
        jobs = [
            create_job(client, alice, file_id, model="soft", method=prompt_method, suffix="a"),
            create_job(client, alice, file_id, model="soft", suffix="b"),  # prefix tuning
        ]
        for job in jobs:
            assert job.status_code == 200, job.text
            assert wait_status(client, alice, job.json()["id"], {"queued"})["status"] == "queued"
        files = peft_files(adapters["prefix"])
        replaced = upload(client, alice, files, name="soft", overwrite="true")
        assert replaced.status_code == 201, replaced.text
        worker = client.app.state.services.worker  # type: ignore[attr-defined]
        worker.max_running = 2
        worker.wake()
        length = NUM_VIRTUAL_TOKENS["prompt"]
        for job, method in zip(jobs, ("prompt_tuning", "prefix_tuning"), strict=True):
            ended = wait_status(client, alice, job.json()["id"])
            assert ended["status"] == "failed", ended
            error = ended["error"]
            assert (error["code"], error["param"]) == ("source_changed", "model"), error
            for word in ("alice/soft", "version 2", "prefix_tuning", method, f"of {length}"):
                assert word in error["message"], error
        assert served_tokens(client, alice, "alice/soft")


def test_a_source_replaced_while_the_job_reads_it_is_checked_as_read(
    client: TestClient, tenant: TenantAuth, upload_adapter: Upload
) -> None:
    """The version a job read the source's info from is replaced before its values are read:
    the values come from the version actually pinned, checked again, never a mismatch."""
    upload_adapter(tenant, "soft", "prompt")
    registry = client.app.state.services.registry  # type: ignore[attr-defined]
    stale = registry.resolve("soft", tenant="alice")
    upload_adapter(tenant, "soft", "prefix", overwrite="true")
    length = NUM_VIRTUAL_TOKENS["prompt"]
    with pytest.raises(SourceChanged) as changed:
        initial_values(stale, PrefixKind.PREFIX_TUNING, registry, "alice", length)
    assert "version 2" in str(changed.value) and "prefix_tuning" in str(changed.value)
