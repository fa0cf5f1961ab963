"""POST /v1/fine_tuning/transferability: among decoys (random prefixes of every kind, a prefix
trained on another task), the prefix trained on the file's task ranks first; losses equal
PEFT's own on the same examples; rows are held to the tenant's queue; bad input is a clear
4xx naming the field, a foreign file or prefix the same 404 as a missing one; another tenant's
request beside a scoring gets exactly its own tokens."""

from __future__ import annotations

import copy
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from peft import PeftModel

from server.engine.gate import Overloaded
from server.models import LoadedModel
from server.train import Example, PrefixTrainer, TrainConfig
from tests.api.conftest import (
    NUM_VIRTUAL_TOKENS,
    MakeClient,
    Response,
    TenantAuth,
    alone,
    assert_error,
    create_tenant,
    in_background,
    peft_files,
    upload,
)
from tests.api.test_rate_limits import limits, patch_limits
from tests.api.test_usage import settled
from tests.api.tuning import jsonl, training_file, upload_file, worded

ROUTE = "/v1/fine_tuning/transferability"
TASK = " w40 w41 w42"  # the answer the file asks for, whatever the prompt
OTHER_TASK = " w200 w201 w202"
TRAIN_PROMPTS = [f"w{i} w{i + 1} w{i + 2}" for i in range(1, 30, 4)]
# The file scored holds prompts no prefix was trained on: the task, not the examples, transfers.
FILE_PROMPTS = [f"w{i} w{i + 3}" for i in range(100, 130, 3)]
TOLERANCE = 1e-5


def examples_of(model: LoadedModel, prompts: list[str], completion: str) -> list[Example]:
    encode = model.tokenizer.encode  # type: ignore[union-attr]
    examples = []
    for prompt in prompts:
        ids, target = list(encode(prompt)), list(encode(completion))
        examples.append(Example(ids + target, [-100] * len(ids) + target))
    return examples


def trained(model: LoadedModel, completion: str, folder: Path) -> Path:
    """A prefix-tuning prefix taught `completion` after the training prompts, saved as PEFT
    saves one (a few dozen steps on the tiny model: well under a second)."""
    trainer = PrefixTrainer(
        model, TrainConfig(kind="prefix", virtual_tokens=4, steps=20, learning_rate=0.1)
    )
    try:
        examples = examples_of(model, TRAIN_PROMPTS, completion)
        for _ in range(trainer.config.steps):
            trainer.step(examples)
        trainer.save(folder)
    finally:
        trainer.close()
    return folder


@pytest.fixture(scope="module")
def taught(loaded: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    model = worded(loaded, chat=False)
    root = tmp_path_factory.mktemp("taught")
    return {
        "task": trained(model, TASK, root / "task"),
        "other": trained(model, OTHER_TASK, root / "other"),
    }


@pytest.fixture
def words_client(make_client: MakeClient, loaded: LoadedModel) -> Iterator[TestClient]:
    # A tenant may queue 4 requests: the scoring's rows (8 candidates and the base model, 10
    # examples) pass through half of that, never 429.
    with make_client(model=worded(loaded, chat=False), max_waiting_per_tenant=4) as client:
        yield client


def rank(client: TestClient, who: TenantAuth, **body: Any) -> Response:
    return client.post(ROUTE, json=body, headers=who.headers)


def mean_loss(model: torch.nn.Module, examples: list[Example]) -> float:
    """The independent computation: transformers' own loss (mean over an example's target
    tokens) of each example, weighed by its targets, as a training batch weighs them."""
    total, count = 0.0, 0
    for example in examples:
        ids = torch.tensor([example.input_ids])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=torch.tensor([example.labels])).loss
        targets = sum(label != -100 for label in example.labels[1:])
        total, count = total + float(loss) * targets, count + targets
    return total / count


def test_the_prefix_trained_on_the_task_ranks_first_and_losses_equal_peft(
    words_client: TestClient,
    loaded: LoadedModel,
    adapters: dict[str, Path],
    taught: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = words_client
    alice, bob, carol = (create_tenant(client, name) for name in ("alice", "bob", "carol"))
    for kind, folder in adapters.items():  # random decoys, of every kind
        name = f"random-{kind.replace('_', '-')}"
        assert upload(client, alice, peft_files(folder), name=name).status_code == 201
    uploads = [
        (alice, taught["other"], "other-task", "private"),
        (carol, taught["task"], "same-task", "public"),  # another tenant's, shared
        (carol, adapters["prompt"], "public-random", "public"),
        (bob, taught["task"], "hidden", "private"),  # another tenant's private one: never
    ]
    for who, folder, name, visibility in uploads:
        response = upload(client, who, peft_files(folder), name=name, visibility=visibility)
        assert response.status_code == 201, response.text
    file_id = training_file(
        client, alice, [{"prompt": p, "completion": TASK} for p in FILE_PROMPTS]
    )
    # bob's request beside the scoring gets exactly the tokens it gets alone
    victim_prompt = [9, 8, 7, 6]
    victim = {"prompt": victim_prompt, "prefix": "hidden", "max_new_tokens": 8, "temperature": 0}
    gate = client.app.state.services.engine.gate  # type: ignore[attr-defined]
    queued: list[int] = []  # alice's requests waiting, after each of hers enters
    enter = gate.enter

    def counted_enter(request_id: str, tenant: str) -> None:
        enter(request_id, tenant)
        if tenant == alice.name:
            queued.append(gate.waiting_per_tenant().get(tenant, 0))

    monkeypatch.setattr(gate, "enter", counted_enter)
    with in_background(client, "/v1/generate", victim, bob.headers) as other:
        response = rank(client, alice, training_file=file_id)
    assert response.status_code == 200, response.text
    assert other["response"].status_code == 200, other["response"].text
    expected = alone(loaded, victim_prompt, peft_files(taught["task"]), 8)
    assert other["response"].json()["token_ids"] == expected

    # 80 rows, never more than half of alice's queue (4) waiting: the rest stays hers to use
    assert len(queued) == 8 * len(FILE_PROMPTS) and max(queued) <= 2
    body = response.json()
    ranking = [entry["prefix"] for entry in body["data"]]
    assert ranking[0] == "carol/same-task", body
    assert sorted(ranking) == sorted(
        [f"alice/random-{k}" for k in ("prefix", "prefix-projection", "prompt", "p-tuning")]
        + ["alice/other-task", "carol/same-task", "carol/public-random"]
    )  # own and public, usable on this model; bob's private prefix is not among them
    losses = [entry["loss"] for entry in body["data"]]
    assert losses == sorted(losses)
    assert losses[0] < body["base_loss"] < losses[-1], body
    assert body["truncated"] is False
    assert body["lines"] == list(range(1, len(FILE_PROMPTS) + 1))  # 10 examples: all of them
    model = worded(loaded, chat=False)
    examples = examples_of(model, FILE_PROMPTS, TASK)
    assert body["target_tokens"] == 3 * len(FILE_PROMPTS)

    # Each loss equals PEFT's on the same examples (a prefix-tuning and a P-tuning candidate)
    by_ref = {entry["prefix"]: entry["loss"] for entry in body["data"]}
    for ref, folder in [
        ("carol/same-task", taught["task"]),
        ("alice/random-p-tuning", adapters["p_tuning"]),
    ]:
        peft = PeftModel.from_pretrained(copy.deepcopy(loaded.model), folder).eval()
        assert abs(by_ref[ref] - mean_loss(peft, examples)) < TOLERANCE, ref
    assert abs(body["base_loss"] - mean_loss(loaded.model, examples)) < TOLERANCE


def test_named_candidates_a_sample_and_its_seed(
    words_client: TestClient, adapters: dict[str, Path], taught: dict[str, Path]
) -> None:
    client = words_client
    alice = create_tenant(client, "alice")
    for name, folder in [("task", taught["task"]), ("other", taught["other"])]:
        assert upload(client, alice, peft_files(folder), name=name).status_code == 201
    records = [{"prompt": p, "completion": TASK} for p in FILE_PROMPTS]
    file_id = training_file(client, alice, records)
    body = {"training_file": file_id, "candidates": ["other", "alice/task"], "sample_size": 4}
    first = rank(client, alice, **body, seed=7)
    assert first.status_code == 200, first.text
    answer = first.json()
    assert [entry["prefix"] for entry in answer["data"]] == ["alice/task", "alice/other"]
    assert len(answer["lines"]) == 4 and answer["lines"] == sorted(answer["lines"])
    assert answer["target_tokens"] == 3 * 4
    again = rank(client, alice, **body, seed=7).json()
    assert again["lines"] == answer["lines"]  # the same examples, so the same losses (within
    # float32 rounding: the rows beside them in a step may differ)
    for entry, before in zip(again["data"], answer["data"], strict=True):
        assert entry["prefix"] == before["prefix"]
        assert abs(entry["loss"] - before["loss"]) < TOLERANCE
    others = {tuple(rank(client, alice, **body, seed=s).json()["lines"]) for s in range(5)}
    assert len(others) > 1  # the seed chooses the examples


def test_bad_requests_are_clear_4xx_and_reveal_nothing(
    make_client: MakeClient, loaded: LoadedModel, adapters: dict[str, Path]
) -> None:
    settings = {"max_transferability_candidates": 2, "max_transferability_sample": 3}
    with make_client(model=worded(loaded, chat=False), max_len=32, **settings) as client:
        alice, bob = create_tenant(client, "alice"), create_tenant(client, "bob")
        for who in (alice, bob):
            response = upload(client, who, peft_files(adapters["prefix"]), name="mine")
            assert response.status_code == 201, response.text
        own = training_file(client, alice)
        foreign = training_file(client, bob)

        def refused(status: int, field: str, **body: Any) -> dict[str, Any]:
            response = rank(client, alice, **{"training_file": own, **body})
            error = assert_error(response, status, field)
            assert field in (error.get("field"), *(d["field"] for d in error.get("details", [])))
            return error

        missing = refused(404, "training_file", training_file="file-abc")
        hidden = refused(404, "training_file", training_file=foreign)
        assert hidden["message"] == missing["message"].replace("file-abc", foreign)
        missing = refused(404, "candidates", candidates=["alice/absent"])
        hidden = refused(404, "candidates", candidates=["bob/mine"])
        assert hidden["message"] == missing["message"].replace("alice/absent", "bob/mine")
        refused(422, "candidates", candidates=["mine", "bob/mine", "x"])  # over the bound
        refused(422, "candidates", candidates=["mine", "alice/mine"])  # the same one twice
        refused(422, "candidates", candidates=["a/b/c"])
        refused(422, "candidates", candidates=[])
        refused(422, "sample_size", sample_size=4)  # over the bound
        refused(422, "sample_size", sample_size=0)
        refused(422, "seed", seed=-1)
        refused(422, "temperature", temperature=0)  # not a field of this route
        # examples that do not fit the context beside the longest candidate
        long = [{"prompt": " ".join(["w5"] * 26), "completion": " w6 w7 w8 w9 w10"}]
        response = upload_file(client, alice, jsonl(long))
        assert response.status_code == 200, response.text
        error = refused(400, "training_file", training_file=response.json()["id"])
        assert error["line"] == 1
        # nothing of it stays: the same request within bounds answers
        response = rank(client, alice, training_file=own, candidates=["mine"])
        assert response.status_code == 200, response.text
        assert [entry["prefix"] for entry in response.json()["data"]] == ["alice/mine"]


def test_a_scoring_is_held_to_the_token_limit_and_counted_in_usage(
    make_client: MakeClient,
    loaded: LoadedModel,
    adapters: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every row's prompt tokens are reserved before any is queued (beyond the whole limit 400,
    beyond what is left 429 with Retry-After), and each row counts in usage under its prefix."""
    model = worded(loaded, chat=False)
    with make_client(model=model, usage_flush_interval=0.05) as client:
        alice = create_tenant(client, "alice")
        assert upload(client, alice, peft_files(adapters["prefix"]), name="mine").status_code == 201
        records = [{"prompt": p, "completion": TASK} for p in FILE_PROMPTS[:3]]
        file_id = training_file(client, alice, records)
        tokenizer: Any = model.tokenizer
        tokens = sum(  # each example's tokens, as the training file's examples are made
            len(tokenizer.encode(r["prompt"]))
            + len(tokenizer.encode(r["completion"], add_special_tokens=False))
            + (tokenizer.eos_token_id is not None)
            for r in records
        )
        body = {"training_file": file_id, "candidates": ["mine"], "sample_size": 3}
        reserved = 2 * tokens  # the base model's rows and the candidate's

        patch_limits(client, "alice", tokens_per_minute=reserved - 1)
        error = assert_error(rank(client, alice, **body), 400, "sample_size")
        assert str(reserved) in error["message"]

        patch_limits(client, "alice", tokens_per_minute=reserved + reserved // 2)
        first = rank(client, alice, **body)
        assert first.status_code == 200, first.text
        assert int(limits(first)["tokens.remaining"]) <= reserved // 2
        second = rank(client, alice, **body)
        assert_error(second, 429, "rate limited")
        assert int(second.headers["retry-after"]) >= 1

        # A minute on (the limiter's clock moved, not waited for), a scoring the engine refuses
        # before any row runs gives its reservation back: the next one fits.
        services = client.app.state.services  # type: ignore[attr-defined]
        real = services.rate_limiter.clock
        services.rate_limiter.clock = lambda: real() + 61

        def refuse(*args: Any, **kwargs: Any) -> None:
            raise Overloaded(1.0, 0, alice.name)

        monkeypatch.setattr(services.engine, "submit", refuse)
        assert_error(rank(client, alice, **body), 429, "overloaded")
        monkeypatch.undo()
        third = rank(client, alice, **body)
        assert third.status_code == 200, third.text

        model_id = first.json()["model"]
        settled(client, alice.api_key, {
            model_id: Counter(requests=2, rows=6, prompt_tokens=2 * tokens, failed_invalid=1,
                              failed_rate_limited=1, failed_overloaded=1),
            "alice/mine": Counter(requests=0, rows=6, prompt_tokens=2 * tokens,
                                  virtual_tokens=6 * NUM_VIRTUAL_TOKENS["prefix"]),
        })  # fmt: skip


def test_the_document_states_the_servers_bounds(make_client: MakeClient) -> None:
    settings = {"max_transferability_candidates": 5, "max_transferability_sample": 7}
    with make_client(**settings) as client:
        document = client.get("/openapi.json").json()
    schema = document["components"]["schemas"]["TransferabilityRequest"]["properties"]
    arrays = [b for b in [schema["candidates"], *schema["candidates"].get("anyOf", [])]]
    assert [b["maxItems"] for b in arrays if b.get("type") == "array"] == [5]
    integers = [b for b in [schema["sample_size"], *schema["sample_size"].get("anyOf", [])]]
    assert [b["maximum"] for b in integers if b.get("type") == "integer"] == [7]
    assert json.dumps(document["paths"][ROUTE]["post"]["responses"]).count("ErrorBody") >= 5
