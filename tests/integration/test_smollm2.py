"""The real embedded model (SmolLM2-135M-Instruct) against PEFT, one adapter of each kind."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from prefixes import read_upload
from server.engine.llm import LLM
from server.engine.request import Request, SamplingParams
from server.models import LoadedModel, load_model
from tests.tiny import base_greedy, make_adapter, peft_greedy

pytestmark = pytest.mark.slow
MODEL_CACHE = Path(__file__).resolve().parents[2] / "data" / "models"  # shared with `make serve`
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def smollm2() -> LoadedModel:
    return load_model(None, cache_dir=MODEL_CACHE)


def test_embedded_model_loads_offline_with_its_tokenizer(smollm2: LoadedModel) -> None:
    spec = smollm2.spec
    assert (spec.num_layers, spec.hidden_size, spec.num_kv_heads, spec.head_dim) == (30, 576, 3, 64)
    llm = LLM(smollm2, num_slots=1, max_len=256)
    prompt = smollm2.tokenizer.encode("The capital of France is")
    (request,) = llm.generate([Request(prompt, SamplingParams(max_new_tokens=3, temperature=0))])
    assert request.text.strip().startswith("Paris")


def test_one_adapter_of_each_kind_matches_peft_in_one_batch(
    smollm2: LoadedModel, tmp_path: Path
) -> None:
    base = copy.deepcopy(smollm2.model)  # PEFT wraps its copy; the served model stays frozen
    tokenizer = smollm2.tokenizer
    prompts = [
        "Write a haiku about the sea.",
        "The capital of France is",
        "def fibonacci(n):",
        "Once upon a time",
        "List three colours:",
    ]
    kinds = ["prefix", "prompt", "p_tuning", "prefix_projection", None]
    llm = LLM(smollm2, num_slots=len(kinds), max_len=256)
    requests, expected = [], []
    for i, (kind, text) in enumerate(zip(kinds, prompts, strict=True)):
        prompt = tokenizer.encode(text)
        prefix = None
        if kind is None:
            expected.append(base_greedy(base, prompt, NEW_TOKENS))
        else:
            peft_model = make_adapter(base, kind, 4 + 3 * i, tmp_path / kind, seed=i)
            expected.append(peft_greedy(peft_model, prompt, NEW_TOKENS))
            files = {p.name: p.read_bytes() for p in (tmp_path / kind).iterdir()}
            prefix = llm.compile(read_upload(files))
        params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
        requests.append(Request(prompt, params, prefix))

    llm.generate(requests)

    for kind, request, tokens in zip(kinds, requests, expected, strict=True):
        assert request.output_token_ids == tokens, kind


def test_chat_completions_use_the_models_chat_template(
    smollm2: LoadedModel, tmp_path: Path
) -> None:
    from fastapi.testclient import TestClient

    from server.api.app import create_app
    from server.config import Settings

    settings = Settings(data_dir=tmp_path, admin_key="admin", num_slots=2, max_len=512)
    with TestClient(create_app(settings, loaded=smollm2, background_start=False)) as client:
        created = client.post(
            "/v1/tenants", json={"name": "alice"}, headers={"Authorization": "Bearer admin"}
        )
        headers = {"Authorization": f"Bearer {created.json()['api_key']}"}
        body = {
            "model": smollm2.model_id,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 12,
            "temperature": 0,
        }
        answer = client.post("/v1/chat/completions", json=body, headers=headers).json()
    assert answer["object"] == "chat.completion"
    assert "Paris" in answer["choices"][0]["message"]["content"]
    assert answer["usage"]["prompt_tokens"] > 10  # the template wrapped the message


def test_ensembles_on_the_embedded_model_match_peft(smollm2: LoadedModel, tmp_path: Path) -> None:
    """A vote's candidates equal each member's PEFT `generate`; a mean equals the plain loop
    over the members' PEFT models; a bystander's request in the same batch stays exact."""
    from server.engine.request import RequestGroup
    from tests.integration.test_ensemble_engine import mean_reference

    base = copy.deepcopy(smollm2.model)
    tokenizer = smollm2.tokenizer
    kinds = ["prefix", "prompt", "prefix"]
    models = [
        make_adapter(base, k, 5 + i, tmp_path / f"m{i}", seed=20 + i) for i, k in enumerate(kinds)
    ]
    prefixes = [
        read_upload({p.name: p.read_bytes() for p in (tmp_path / f"m{i}").iterdir()})
        for i in range(len(kinds))
    ]
    llm = LLM(smollm2, num_slots=8, max_len=256)
    prompt = tokenizer.encode("Review: a warm, funny film.\nSentiment:")
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    vote = [Request(prompt, params, llm.compile(p), vote_logprobs=True) for p in prefixes]
    mean = [Request(prompt, params, llm.compile(p)) for p in prefixes]
    bystander_prompt = tokenizer.encode("Once upon a time")
    bystander = Request(bystander_prompt, params, llm.compile(prefixes[1]))
    RequestGroup(vote, lockstep=False)
    RequestGroup(mean, lockstep=True)
    llm.generate([vote[0], bystander, mean[0]])

    for request, model in zip(vote, models, strict=True):
        assert request.output_token_ids == peft_greedy(model, prompt, NEW_TOKENS)
    assert mean[0].output_token_ids == mean_reference(models, prompt, NEW_TOKENS)
    assert bystander.output_token_ids == peft_greedy(models[1], bystander_prompt, NEW_TOKENS)
