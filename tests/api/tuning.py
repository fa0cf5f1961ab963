"""What the fine-tuning tests share: the tiny model with a word tokenizer and a chat template,
training files that teach a fixed answer, and a way to hold a job in the middle of training."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.models import LoadedModel, wrap_model
from server.train import Example, PrefixTrainer
from tests.api.conftest import Response, TenantAuth, wait_for
from tests.tiny import word_tokenizer

MODEL = "tiny-words"
# Token i is the word w{i}. Every prompt is taught the same answer, which the base model does
# not give (checked by the tests that use it).
PROMPTS = ["w1 w2 w3", "w4 w5", "w9 w8 w7 w6"]
ANSWER = "w40 w41 w42"
# user turns start with w1, assistant turns with w2, every turn ends with w3
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}w2 {% else %}w1 {% endif %}"
    "{{ m['content'] }} w3 {% endfor %}{% if add_generation_prompt %}w2 {% endif %}"
)
# What teaches ANSWER on the tiny model in a few dozen steps.
TEACH = {"n_epochs": 20, "batch_size": 3, "learning_rate_multiplier": 3}
ENDED = {"succeeded", "failed", "cancelled"}


def worded(loaded: LoadedModel, *, chat: bool = True) -> LoadedModel:
    """The session's tiny model with a word tokenizer (and a chat template)."""
    tokenizer = word_tokenizer()
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    return wrap_model(loaded.model, tokenizer, MODEL)


def jsonl(records: list[Any]) -> bytes:
    return "\n".join(json.dumps(record) for record in records).encode()


def taught_records() -> list[dict[str, str]]:
    return [{"prompt": prompt, "completion": " " + ANSWER} for prompt in PROMPTS]


def upload_file(
    client: TestClient, who: TenantAuth, content: bytes, *, name: str = "train.jsonl", **data: str
) -> Response:
    return client.post(
        "/v1/files",
        files={"file": (name, content)},
        data={"purpose": "fine-tune", **data},
        headers=who.headers,
    )


def training_file(client: TestClient, who: TenantAuth, records: list[Any] | None = None) -> str:
    response = upload_file(client, who, jsonl(records or taught_records()))
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def create_job(client: TestClient, who: TenantAuth, file_id: str, **fields: Any) -> Response:
    # A fixed seed: what a job learns in a few dozen steps must not depend on the draw.
    body = {"model": MODEL, "training_file": file_id, "hyperparameters": TEACH, "seed": 0, **fields}
    return client.post("/v1/fine_tuning/jobs", json=body, headers=who.headers)


def start_job(client: TestClient, who: TenantAuth, **fields: Any) -> dict[str, Any]:
    response = create_job(client, who, training_file(client, who), **fields)
    assert response.status_code == 200, response.text
    return dict(response.json())


def get_job(client: TestClient, who: TenantAuth, job_id: str) -> dict[str, Any]:
    response = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=who.headers)
    assert response.status_code == 200, response.text
    return dict(response.json())


def wait_status(
    client: TestClient, who: TenantAuth, job_id: str, statuses: set[str] = ENDED
) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def reached() -> bool:
        found.update(get_job(client, who, job_id))
        return found["status"] in statuses

    wait_for(reached, f"job {job_id} to reach {sorted(statuses)}", timeout=120)
    return found


def events(client: TestClient, who: TenantAuth, job_id: str) -> list[dict[str, Any]]:
    """Every event of the job, oldest first."""
    response = client.get(
        f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 1000}, headers=who.headers
    )
    assert response.status_code == 200, response.text
    return list(reversed(response.json()["data"]))


def complete(client: TestClient, who: TenantAuth, model: str, prompt: str, n: int = 3) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0}
    response = client.post("/v1/completions", json=body, headers=who.headers)
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["text"]).strip()


Turn = Callable[[], AbstractContextManager[object]]


class HeldTraining:
    """Holds every job inside its first optimiser step: it goes on training for real (forward,
    backward and update in turns on the device shared with serving) until `release()`, or
    until it is cancelled or the server stops. Deterministic: nothing depends on timing."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.holding = threading.Event()
        self.trainers: list[PrefixTrainer] = []
        self._release = threading.Event()
        real = PrefixTrainer.step

        def held(
            trainer: PrefixTrainer, batch: list[Example], turn: Turn = nullcontext, **options: Any
        ) -> float:
            loss = real(trainer, batch, turn, **options)
            self.trainers.append(trainer)
            self.holding.set()
            while not self._release.is_set():
                real(trainer, batch, turn)  # a cancelled job's turn raises here
            return loss

        monkeypatch.setattr(PrefixTrainer, "step", held)

    def wait(self) -> None:
        assert self.holding.wait(60), "no job started training"

    def release(self) -> None:
        self._release.set()
