"""Requests that cannot run are refused up front with a message naming the problem."""

from __future__ import annotations

import pytest

from server.engine.llm import LLM
from server.engine.request import Request, SamplingParams
from tests.tiny import tiny_loaded


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(tiny_loaded("gpt2"), num_slots=2, max_len=64)


def test_prompt_longer_than_the_context_is_refused(llm: LLM) -> None:
    with pytest.raises(
        ValueError, match=r"prompt: expected prefix \+ prompt tokens < 64, found 64"
    ):
        llm.add(Request([1] * 64))


def test_token_ids_outside_the_vocabulary_are_refused(llm: LLM) -> None:
    with pytest.raises(ValueError, match=r"token ids in \[0, 384\)"):
        llm.add(Request([1, 384]))
    with pytest.raises(ValueError, match="token ids"):
        llm.add(Request([-1]))


def test_empty_prompt_is_refused() -> None:
    with pytest.raises(ValueError, match="prompt: expected at least one token"):
        Request([])


def test_max_len_is_capped_by_learned_positions() -> None:
    llm = LLM(tiny_loaded("gpt2"), num_slots=1, max_len=10_000)
    assert llm.max_len == 128  # GPT-2's n_positions in the tiny config


def test_generation_stops_at_the_end_of_the_context(llm: LLM) -> None:
    (request,) = llm.generate([Request([1] * 60, SamplingParams(max_new_tokens=50, temperature=0))])
    assert request.finish_reason == "length"
    assert len(request.output_token_ids) == 5  # positions 60..63 fed back, one more sampled
