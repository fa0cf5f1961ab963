"""A tenant's prefix of extreme values never corrupts another tenant's answers.

Mallory uploads real PEFT adapters whose every value is +-v. Values the serving dtype cannot hold
are refused at upload (422 naming the values); finite ones are accepted, and her requests fail
alone (422 numerical_overflow) while bob's requests, admitted in the same steps and into the slots
her requests left dirty, get exactly the tokens they get alone.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from server.engine.engine import Engine
from server.models import LoadedModel
from tests.api.conftest import (
    MakeClient,
    Response,
    TenantAuth,
    alone,
    assert_error,
    create_tenant,
    peft_files,
    upload,
)
from tests.tiny import make_adapter, tiny_loaded

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@pytest.fixture(scope="module")
def models() -> dict[str, LoadedModel]:
    return {name: tiny_loaded("llama", dtype=dtype) for name, dtype in DTYPES.items()}


@pytest.fixture(scope="module")
def long_adapter(models: dict[str, LoadedModel], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prefix tuning with 40 virtual tokens: longer than bob's prefix and prompt, so the slot
    positions past bob's end hold mallory's raw prefix values, not only her prompt's K/V."""
    out = tmp_path_factory.mktemp("long") / "prefix"
    make_adapter(models["float32"].model, "prefix", 40, out, seed=7)
    return out


def extreme_adapter(source: Path, out: Path, value: float) -> Path:
    """The same PEFT adapter, every weight replaced by +-value (signs from the original)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_bytes((source / "adapter_config.json").read_bytes())
    weights = load_file(source / "adapter_model.safetensors")
    save_file(
        {name: t.sign().where(t != 0, 1) * value for name, t in weights.items()},
        out / "adapter_model.safetensors",
    )
    return out


class AdmitTogether:
    """Holds the engine before a step until `n` requests wait, so they are admitted in the same
    step and share the forward passes. Deterministic: no timing decides who is beside whom."""

    def __init__(self, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
        self.expected = 0
        step = engine.core.step

        def gated_step() -> Any:
            if not self.expected:
                return step()
            deadline = time.monotonic() + 20
            while (
                sum(engine.waiting_per_tenant().values()) < self.expected
                and time.monotonic() < deadline
            ):
                time.sleep(0.001)
            self.expected = 0
            # Skip this step: the engine reads its inbox again, so the next step finds them all.
            return []

        monkeypatch.setattr(engine.core, "step", gated_step)


def post_together(
    client: TestClient, gate: AdmitTogether, requests: list[tuple[dict[str, Any], TenantAuth]]
) -> list[Response]:
    gate.expected = len(requests)
    with ThreadPoolExecutor(len(requests)) as pool:
        futures = [
            pool.submit(client.post, "/v1/generate", json=body, headers=who.headers)
            for body, who in requests
        ]
        return [f.result(timeout=60) for f in futures]


@pytest.fixture
def world(
    make_client: MakeClient, models: dict[str, LoadedModel], request: pytest.FixtureRequest
) -> Iterator[tuple[TestClient, LoadedModel]]:
    model = models[request.param]
    with make_client(model=model, num_slots=2, max_len=96) as client:
        yield client, model


def greedy(prompt: list[int], prefix: str, n: int = 6) -> dict[str, Any]:
    return {"prompt": prompt, "prefix": prefix, "max_new_tokens": n, "temperature": 0,
            "ignore_eos": True}  # fmt: skip


@pytest.mark.parametrize(
    ("world", "value"),
    [
        ("float32", 3e38),
        ("float32", 1e30),
        ("bfloat16", 3e38),
        ("bfloat16", 1e30),
        ("float16", 6e4),
    ],
    indirect=["world"],
)
def test_extreme_prefixes_run_beside_and_before_another_tenant_who_gets_exact_tokens(
    world: tuple[TestClient, LoadedModel],
    adapters: dict[str, Path],
    long_adapter: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    value: float,
) -> None:
    client, model = world
    gate = AdmitTogether(client.app.state.services.engine, monkeypatch)  # type: ignore[attr-defined]
    mallory, bob = create_tenant(client, "mallory"), create_tenant(client, "bob")
    huge = extreme_adapter(long_adapter, tmp_path / "huge", value)
    assert upload(client, mallory, peft_files(huge), name="huge").status_code == 201
    own = peft_files(adapters["prefix_projection"])
    assert upload(client, bob, own, name="own").status_code == 201
    long_prompt = list(range(1, 40))

    # Before: both slots are filled by mallory's long rows. Hers may overflow (422) or give
    # garbage that is finite (her own prefix, her own answer); never a 5xx.
    before = post_together(client, gate, [(greedy(long_prompt, "mallory/huge"), mallory)] * 2)
    for response in before:
        assert_own_failure(response)

    # Beside, in her dirty slots: bob's short rows read past their ends up to her long row.
    for prompt in ([5, 6, 7], [9], [11, 12, 13, 14]):
        mine, hers = post_together(
            client,
            gate,
            [(greedy(prompt, "own"), bob), (greedy(long_prompt, "mallory/huge"), mallory)],
        )
        assert mine.status_code == 200, mine.text
        assert mine.json()["token_ids"] == alone(model, prompt, own, 6), prompt
        assert_own_failure(hers)

    assert "prefix_server_engine_failed_steps_total 0.0" in client.get("/metrics").text


def assert_own_failure(response: Response) -> None:
    if response.status_code != 200:
        error = assert_error(response, 422, "NaN or infinite")
        assert error["type"] == "numerical_overflow"


@pytest.mark.parametrize(
    ("world", "value"),
    [("float16", 1e5), ("float16", 3e38), ("bfloat16", 3.4e38)],
    indirect=["world"],
)
def test_values_that_overflow_the_serving_dtype_are_refused_at_upload(
    world: tuple[TestClient, LoadedModel], adapters: dict[str, Path], tmp_path: Path, value: float
) -> None:
    client, _ = world
    mallory = create_tenant(client, "mallory")
    dtype = next(name for name, d in DTYPES.items() if d == client.app.state.services.loaded.dtype)  # type: ignore[attr-defined]
    for kind in ("prefix", "prefix_projection"):
        huge = extreme_adapter(adapters[kind], tmp_path / kind, value)
        error = assert_error(upload(client, mallory, peft_files(huge), name=kind), 422, dtype)
        assert error["field"] == "values" and "NaN or Inf" in error["message"]
    listed = client.get("/v1/prefixes", headers=mallory.headers).json()
    assert listed["data"] == []


def test_a_streamed_request_that_overflows_ends_with_its_own_error_event(
    make_client: MakeClient, adapters: dict[str, Path], tmp_path: Path
) -> None:
    with make_client() as client:
        mallory = create_tenant(client, "mallory")
        huge = extreme_adapter(adapters["prefix"], tmp_path / "huge", 3e38)
        assert upload(client, mallory, peft_files(huge), name="huge").status_code == 201
        body = {**greedy([1, 2, 3], "huge"), "stream": True}
        with client.stream("POST", "/v1/generate", json=body, headers=mallory.headers) as response:
            events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert '"type": "numerical_overflow"' in events[-2]
