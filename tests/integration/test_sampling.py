"""Seeded sampling is a property of the request, not of the batch it runs in."""

from __future__ import annotations

from pathlib import Path

from prefixes import read_upload
from server.engine.llm import LLM
from server.engine.request import Request, SamplingParams
from tests.tiny import make_adapter, tiny_loaded

SAMPLED = SamplingParams(max_new_tokens=12, temperature=0.9, top_k=40, top_p=0.95, seed=1234)


def test_seeded_request_gives_the_same_tokens_alone_and_in_a_mixed_batch(tmp_path: Path) -> None:
    loaded = tiny_loaded("llama")
    make_adapter(loaded.model, "prefix", 6, tmp_path / "a", seed=0)
    llm = LLM(loaded, num_slots=8, max_len=128)
    prefix = llm.compile(read_upload({p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}))
    prompt = [5, 17, 99, 3]

    (alone,) = llm.generate([Request(prompt, SAMPLED, prefix)])
    others = [
        Request([1, 2, 3, 4, 5, 6, 7], SamplingParams(max_new_tokens=5, temperature=0)),
        Request([9, 9], SamplingParams(max_new_tokens=20, temperature=1.3)),  # unseeded
        Request([42] * 11, SamplingParams(max_new_tokens=9, temperature=0.7, seed=7), prefix),
    ]
    mixed = Request(prompt, SAMPLED, prefix)
    llm.add(others[0])
    llm.step()  # the seeded request joins a batch that is already decoding
    llm.generate([mixed, *others[1:]])

    assert mixed.output_token_ids == alone.output_token_ids
    assert len(alone.output_token_ids) == SAMPLED.max_new_tokens


def test_different_seeds_sample_different_tokens() -> None:
    llm = LLM(tiny_loaded("qwen2"), num_slots=4, max_len=128)
    params = [SamplingParams(max_new_tokens=16, temperature=1.0, seed=seed) for seed in (1, 2, 1)]
    first, second, again = llm.generate([Request([3, 1, 4, 1, 5], p) for p in params])
    assert first.output_token_ids == again.output_token_ids
    assert first.output_token_ids != second.output_token_ids


def test_greedy_and_sampled_rows_share_a_batch_without_changing_greedy_rows() -> None:
    llm = LLM(tiny_loaded("gpt2"), num_slots=4, max_len=128)
    greedy = SamplingParams(max_new_tokens=10, temperature=0)
    (alone,) = llm.generate([Request([7, 8, 9], greedy)])
    together = llm.generate(
        [Request([7, 8, 9], greedy), Request([7, 8, 9], SamplingParams(10, temperature=1.5))]
    )
    assert together[0].output_token_ids == alone.output_token_ids
