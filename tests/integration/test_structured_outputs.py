"""Structured outputs in the engine: constrained rows of a mixed batch, each under its own
grammar, equal transformers' `generate` on the PEFT model with llguidance's own mask as its
logits processor; unconstrained rows beside them equal PEFT alone; every answer that ends with
`stop` is valid, over a few hundred sampled and greedy requests with random prefixes."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from prefixes import read_upload
from server.engine.llm import LLM
from server.engine.request import InvalidRequest, Request, SamplingParams
from server.models import LoadedModel
from tests.grammar_support import CONSTRAINTS, GrammarProcessor, tiny_smol, valid
from tests.tiny import ADAPTER_KINDS, make_adapter

NEW_TOKENS = 24


@pytest.fixture(scope="module")
def smol() -> LoadedModel:
    return tiny_smol()


@pytest.fixture(scope="module")
def adapters(smol: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("grammar-adapters")
    for seed, kind in enumerate(ADAPTER_KINDS):
        make_adapter(smol.model, kind, 3 + seed, root / kind, seed=seed)
    return {kind: root / kind for kind in ADAPTER_KINDS}


def reference(
    smol: LoadedModel, adapter: Path | None, prompt: list[int], processor: GrammarProcessor | None
) -> list[int]:
    """transformers' greedy `generate` of one request on the PEFT model (or the base model)."""
    model = copy.deepcopy(smol.model)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            logits_processor=[processor] if processor is not None else None,
            eos_token_id=smol.tokenizer.eos_token_id,
            pad_token_id=smol.tokenizer.eos_token_id,
        )
    return list(out[0, len(prompt) :].tolist())


def test_constrained_rows_equal_transformers_with_the_grammars_own_mask(
    smol: LoadedModel, adapters: dict[str, Path]
) -> None:
    tokenizer = smol.tokenizer
    kinds: list[str | None] = [*ADAPTER_KINDS, None]
    cases = list(itertools.product(kinds, [*CONSTRAINTS, None]))  # None: unconstrained
    llm = LLM(smol, num_slots=len(cases), max_len=256)
    compiled = {id(c): smol.grammars.compile(*c) for c in CONSTRAINTS}
    prefixes = {
        kind: llm.compile(read_upload({p.name: p.read_bytes() for p in adapters[kind].iterdir()}))
        for kind in ADAPTER_KINDS
    }
    requests, expected = [], []
    for i, (kind, constraint) in enumerate(cases):
        prompt = tokenizer.encode(f"Answer {i}: what is it?")
        grammar = compiled[id(constraint)] if constraint is not None else None
        sampling = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0, grammar=grammar)
        prefix = prefixes[kind] if kind is not None else None
        requests.append(Request(prompt, sampling, prefix))
        processor = GrammarProcessor(grammar) if grammar is not None else None
        adapter = adapters[kind] if kind is not None else None
        expected.append(reference(smol, adapter, prompt, processor))

    llm.generate(requests)  # every row in one batch: 5 prefix kinds x 7 constraints

    for (kind, constraint), request, tokens in zip(cases, requests, expected, strict=True):
        assert request.output_token_ids == tokens, (kind, constraint)
        if constraint is not None and request.finish_reason == "stop":
            assert valid(*constraint, request.text), (constraint, request.text)
    finished = [r for r, (_, c) in zip(requests, cases, strict=True) if c is not None]
    assert sum(r.finish_reason == "stop" for r in finished) >= len(finished) // 3


def test_every_answer_that_stops_is_valid_over_hundreds_of_mixed_requests(
    smol: LoadedModel, adapters: dict[str, Path]
) -> None:
    tokenizer = smol.tokenizer
    llm = LLM(smol, num_slots=16, max_len=256)
    compiled = [(c, smol.grammars.compile(*c)) for c in CONSTRAINTS]
    prefixes = [None] + [
        llm.compile(read_upload({p.name: p.read_bytes() for p in adapters[kind].iterdir()}))
        for kind in ADAPTER_KINDS
    ]
    rng = torch.Generator().manual_seed(0)
    requests, constraints = [], []
    for i in range(300):
        constraint, grammar = compiled[i % len(compiled)]
        pick = int(torch.randint(len(prefixes), (), generator=rng))
        greedy = i % 4 == 0
        sampling = SamplingParams(
            max_new_tokens=48, temperature=0 if greedy else 1.0, seed=i, grammar=grammar
        )
        prompt = tokenizer.encode(f"Request {i}:")
        requests.append(Request(prompt, sampling, prefixes[pick]))
        constraints.append(constraint)

    llm.generate(requests)

    stopped = [
        (c, r) for c, r in zip(constraints, requests, strict=True) if r.finish_reason == "stop"
    ]
    invalid = [(c[0], r.text) for c, r in stopped if not valid(*c, r.text)]
    assert not invalid, invalid[:5]
    assert all(r.finish_reason in ("stop", "length") for r in requests)
    assert len(stopped) >= 150, len(stopped)  # enough answers ended to make the check count


def test_a_constraint_refuses_what_would_let_it_run_past_its_end(smol: LoadedModel) -> None:
    grammar = smol.grammars.compile("choice", ["a", "b"])
    with pytest.raises(InvalidRequest, match="ignore_eos"):
        SamplingParams(grammar=grammar, ignore_eos=True)
    with pytest.raises(InvalidRequest, match="min_tokens"):
        SamplingParams(grammar=grammar, min_tokens=3)


@pytest.mark.parametrize(
    ("kind", "value", "message"),
    [
        ("regex", "(a|b", "unclosed group"),
        ("grammar", "start: foo", "unknown name"),
        ("json_schema", {"type": "no-such-type"}, "json_schema"),
        ("choice", [], "choice"),
    ],
)
def test_an_invalid_constraint_is_refused_with_what_is_wrong(
    smol: LoadedModel, kind: str, value: object, message: str
) -> None:
    with pytest.raises(InvalidRequest, match=message):
        smol.grammars.compile(kind, value)


def test_schemas_that_list_properties_in_another_order_answer_in_their_own_order(
    smol: LoadedModel,
) -> None:
    """The cache is keyed by content with its order: each schema's answer lists its properties
    in the order the schema does (as OpenAI's strict schemas promise)."""
    name_first = {
        "type": "object",
        "properties": {"name": {"enum": ["al"]}, "age": {"enum": [3]}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    age_first = {**name_first, "properties": dict(reversed(name_first["properties"].items()))}
    llm = LLM(smol, num_slots=2, max_len=256)
    requests = [
        Request(
            smol.tokenizer.encode("Who?"),
            SamplingParams(
                max_new_tokens=200, temperature=0, grammar=smol.grammars.compile("json_schema", s)
            ),
        )
        for s in (name_first, age_first)
    ]
    llm.generate(requests)
    texts = [r.text for r in requests]
    assert all(r.finish_reason == "stop" for r in requests), texts
    assert [list(json.loads(t)) for t in texts] == [["name", "age"], ["age", "name"]], texts
