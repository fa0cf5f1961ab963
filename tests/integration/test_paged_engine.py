"""The paged engine stays exact: rows sharing a prefix's blocks, prompts prefilled in chunks across
steps, rows preempted and recomputed, blocks reused after a prefix of extreme values all give,
row for row, the greedy tokens PEFT's `generate` gives each request alone, whether attention
reads gathered rows or the pool in place through the block tables."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prefixes import PrefixKind, RawPrefix, read_upload
from server.engine.config import EngineConfig
from server.engine.llm import LLM
from server.engine.request import NonFiniteOutput, Request, SamplingParams
from tests.integration.test_matches_peft import NEW_TOKENS, build_cases, greedy, load
from tests.tiny import make_adapter, peft_greedy, tiny_loaded

BLOCK = 4  # small blocks: prefixes of 3, 5, 7 ... tokens have full and partial blocks
KERNELS = ["gather", "paged"]


def config(**overrides) -> EngineConfig:
    return EngineConfig(
        **{"num_slots": 8, "max_len": 128, "block_size": BLOCK, "max_running_per_tenant": 0,
           **overrides}
    )  # fmt: skip


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_prompts_prefilled_in_chunks_across_steps_match_peft(
    arch: str, kernel: str, tmp_path: Path
) -> None:
    cases = build_cases(arch, "sdpa", tmp_path)
    # 10 tokens per step for 7 rows: the longer prompts (up to 20 tokens) take several steps,
    # while the rows already decoding get their token every step.
    llm = LLM(tiny_loaded(arch), config(max_step_tokens=10, attention_kernel=kernel))
    requests = [greedy(case, load(llm, case)) for case in cases]
    fed_per_step: list[dict[str, int]] = []
    run_step = llm.runner.step

    def recording_step(rows):
        fed_per_step.append({row.request.request_id: row.num_tokens for row in rows})
        return run_step(rows)

    llm.runner.step = recording_step  # type: ignore[method-assign]
    llm.generate(requests)
    longest = max(requests, key=lambda r: len(r.prompt_token_ids))
    prefill_chunks = [
        step[longest.request_id] for step in fed_per_step if step.get(longest.request_id, 1) > 1
    ]
    assert len(prefill_chunks) > 1 and sum(prefill_chunks) == len(longest.prompt_token_ids)
    assert all(sum(step.values()) <= 10 for step in fed_per_step)
    for case, request in zip(cases, requests, strict=True):
        assert request.output_token_ids == case.expected, case.kind


@pytest.mark.parametrize("kernel", KERNELS)
def test_rows_sharing_one_prefix_share_its_blocks_and_match_peft(
    kernel: str, tmp_path: Path
) -> None:
    loaded = tiny_loaded("llama")
    # 9 virtual tokens: two full blocks shared by every row, a partial third copied per row.
    peft_model = make_adapter(loaded.model, "prefix", 9, tmp_path / "shared", seed=3)
    files = {p.name: p.read_bytes() for p in (tmp_path / "shared").iterdir()}
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 384, (n,), generator=generator).tolist() for n in (1, 4, 9, 13)]
    expected = [peft_greedy(peft_model, prompt, NEW_TOKENS) for prompt in prompts]
    llm = LLM(loaded, config(attention_kernel=kernel))
    sampling = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0)
    # A fresh handle per request, as the registry gives: shared by content, not identity.
    requests = [Request(p, sampling, llm.compile(read_upload(files))) for p in prompts]
    for request in requests:
        llm.add(request)
    llm.step()
    tables = [list(r.block_table) for r in requests]
    assert len({tuple(t[:2]) for t in tables}) == 1  # the full blocks, once for all
    assert len({t[2] for t in tables}) == len(tables)  # each row's own partial copy
    while llm.has_work:
        llm.step()
    assert [r.output_token_ids for r in requests] == expected
    assert len(llm.core.scheduler.prefixes.resident) == 1


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rows_preempted_when_blocks_run_out_resume_and_match_peft(
    arch: str, kernel: str, tmp_path: Path
) -> None:
    cases = build_cases(arch, "sdpa", tmp_path)
    loaded = tiny_loaded(arch)
    spec = loaded.spec
    per_block = spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * 4 * BLOCK
    # Room for about two and a half rows' worth of blocks: the batch must preempt to progress.
    llm = LLM(loaded, config(kv_cache_bytes=per_block * 20, max_len=48, attention_kernel=kernel))
    requests = [greedy(case, load(llm, case)) for case in cases]
    llm.generate(requests)
    assert llm.core.metrics.preemptions > 0
    assert any(r.num_preemptions for r in requests)
    for case, request in zip(cases, requests, strict=True):
        assert request.output_token_ids == case.expected, case.kind
    scheduler = llm.core.scheduler
    assert scheduler.blocks_in_use == scheduler.prefixes.num_blocks  # rows gave every block back


@pytest.mark.parametrize("kernel", KERNELS)
def test_blocks_reused_after_a_prefix_of_extreme_values_give_exact_tokens(
    kernel: str, tmp_path: Path
) -> None:
    cases = build_cases("llama", "sdpa", tmp_path)
    loaded = tiny_loaded("llama")
    spec = loaded.spec
    shape = (spec.num_layers, 2, spec.num_kv_heads, 10, spec.head_dim)
    extreme = loaded.compile(RawPrefix(PrefixKind.PREFIX_TUNING, torch.full(shape, 3e38)), 64)
    per_block = spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * 4 * BLOCK
    llm = LLM(
        loaded,
        config(num_slots=2, max_len=64, kv_cache_bytes=per_block * 24, attention_kernel=kernel),
    )
    used: set[int] = set()
    run_step = llm.runner.step

    def recording_step(rows):
        for row in rows:
            used.update(row.request.block_table)
        return run_step(rows)

    llm.runner.step = recording_step  # type: ignore[method-assign]
    attacker = Request(list(range(1, 30)), SamplingParams(max_new_tokens=4, temperature=0), extreme)
    llm.generate([attacker])
    assert isinstance(attacker.error, NonFiniteOutput)
    dirty = set(used)
    # The extreme prefix's own blocks are freed too once another needs room.
    used.clear()
    requests = [greedy(case, load(llm, case)) for case in cases]
    llm.generate(requests)
    assert dirty & used, "no block of the extreme request was reused"
    assert extreme.digest not in llm.core.scheduler.prefixes.resident
    for case, request in zip(cases, requests, strict=True):
        assert request.output_token_ids == case.expected, case.kind


def test_peft_on_the_served_model_is_unchanged_by_the_engines_attention(tmp_path: Path) -> None:
    """The engine's sdpa replaces transformers' for the whole process (attention.py); PEFT,
    training and soft-prompt compiling on the very model it serves must not see a difference."""
    loaded = tiny_loaded("llama")  # 4 query heads over 2 KV heads: the grouped path
    prompt = [5, 17, 33, 2]
    before = peft_greedy(make_adapter(loaded.model, "prefix", 6, tmp_path / "a", 1), prompt, 8)
    llm = LLM(loaded, config())
    files = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    sampling = SamplingParams(max_new_tokens=8, temperature=0)
    (served,) = llm.generate([Request(prompt, sampling, llm.compile(read_upload(files)))])
    after = peft_greedy(make_adapter(loaded.model, "prefix", 6, tmp_path / "b", 1), prompt, 8)
    assert before == after == served.output_token_ids
