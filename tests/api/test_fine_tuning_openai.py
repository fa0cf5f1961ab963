"""The official `openai` client, unchanged, over real HTTP: upload a training file, fine-tune,
poll to success, then complete with `job.fine_tuned_model`."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import uvicorn
from openai.types.fine_tuning import FineTuningJob

from server.api.app import create_app
from server.models import LoadedModel
from tests.api.conftest import app_settings, bearer
from tests.api.tuning import ANSWER, MODEL, PROMPTS, TEACH, jsonl, taught_records, worded


@pytest.fixture
def base_url(loaded: LoadedModel, tmp_path: Path) -> Iterator[str]:
    """The app served by uvicorn on a free port of 127.0.0.1, in a thread of this process."""
    app = create_app(app_settings(tmp_path / "data"), loaded=worded(loaded), background_start=False)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(30)


def tenant_key(base_url: str) -> str:
    import httpx

    response = httpx.post(
        f"{base_url}/tenants", json={"name": "alice"}, headers=bearer("admin-secret"), timeout=30
    )
    assert response.status_code == 201, response.text
    return str(response.json()["api_key"])


def wait(client: openai.OpenAI, job: FineTuningJob) -> FineTuningJob:
    """Poll until the job ends."""
    deadline = time.monotonic() + 120
    while job.status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"job still {job.status}"
        time.sleep(0.05)
        job = client.fine_tuning.jobs.retrieve(job.id)
    return job


def test_the_openai_client_fine_tunes_and_serves_the_result(base_url: str) -> None:
    client = openai.OpenAI(base_url=base_url, api_key=tenant_key(base_url), max_retries=0)
    uploaded = client.files.create(
        file=("teach.jsonl", io.BytesIO(jsonl(taught_records()))), purpose="fine-tune"
    )
    assert uploaded.id.startswith("file-") and uploaded.purpose == "fine-tune"
    assert [f.id for f in client.files.list()] == [uploaded.id]

    job = client.fine_tuning.jobs.create(
        model=MODEL,
        training_file=uploaded.id,
        suffix="taught",
        hyperparameters=TEACH,
        seed=0,  # type: ignore[arg-type]
    )
    assert job.status == "validating_files"
    job = wait(client, job)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == "alice/taught" and (job.trained_tokens or 0) > 0
    assert [j.id for j in client.fine_tuning.jobs.list()] == [job.id]

    for prompt in PROMPTS:
        base = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0)
        tuned = client.completions.create(
            model=job.fine_tuned_model, prompt=prompt, max_tokens=3, temperature=0
        )
        assert base.choices[0].text.strip() != ANSWER
        assert tuned.choices[0].text.strip() == ANSWER
    assert job.fine_tuned_model in [m.id for m in client.models.list()]

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    losses = [e.data["train_loss"] for e in reversed(events) if e.type == "metrics" and e.data]
    assert len(losses) == 20 and losses[-1] < losses[0] / 4  # the loss falls

    # `method` as OpenAI's shape carries it: {"type": T, T: {...}}
    method = {"type": "prompt_tuning", "prompt_tuning": {"num_virtual_tokens": 4}}
    soft = client.fine_tuning.jobs.create(
        model=MODEL,
        training_file=uploaded.id,
        method=method,
        seed=7,  # type: ignore[arg-type]
    )
    assert soft.method and soft.method.type == "prompt_tuning" and soft.seed == 7
    assert wait(client, soft).status == "succeeded"

    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-unknown")
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.cancel(job.id)
    with pytest.raises(openai.BadRequestError, match="line 1"):
        client.files.create(file=("bad.jsonl", io.BytesIO(b"{oops")), purpose="fine-tune")
    assert client.files.delete(uploaded.id).deleted
