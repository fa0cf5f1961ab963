"""Prompt ensembles when the KV pool is too small for everything at once: rows preempted and
recomputed give the tokens (and, for a vote, the log-probabilities) they give unpreempted, greedy
or seeded, and the other tenants' requests beside them stay exact."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from prefixes import CompiledPrefix
from server.engine.engine import Engine
from server.engine.llm import LLM
from server.engine.request import Request, RequestGroup, SamplingParams
from tests.integration.test_ensemble_engine import compiled, config, members
from tests.tiny import peft_greedy, tiny_loaded


def small_pool(**overrides) -> LLM:
    """A pool of 41 blocks of 4 positions: a group of three rows and two long bystanders cannot
    all hold their blocks at once, so someone is preempted."""
    loaded = tiny_loaded("llama")
    spec = loaded.spec
    per_block = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * 4 * 4
    return LLM(
        loaded, config(max_len=48, max_step_tokens=13, kv_cache_bytes=41 * per_block, **overrides)
    )


def run(llm: LLM, group: RequestGroup, others: list[Request]) -> None:
    llm.add(others[0])
    llm.add(group.leader)
    for other in others[1:]:
        llm.add(other)
    while llm.has_work:
        llm.step()


PROMPT = torch.randint(0, 384, (12,), generator=torch.Generator().manual_seed(3)).tolist()
LONG_PROMPTS = [list(range(1, 21)), list(range(30, 50))]
STEPS = 16


def test_a_preempted_vote_keeps_every_members_tokens_and_logprobs(tmp_path: Path) -> None:
    models, folders = members("llama", tmp_path, ["prefix", "prompt", "prefix"])
    greedy = SamplingParams(max_new_tokens=STEPS, temperature=0)
    reference = LLM(tiny_loaded("llama"), config())
    rows = [Request(PROMPT, greedy, compiled(reference, f), vote_logprobs=True) for f in folders]
    reference.add(RequestGroup(rows, lockstep=False).leader)
    while reference.has_work:
        reference.step()

    llm = small_pool()
    voters = [
        Request(PROMPT, greedy, compiled(llm, f), tenant="v", vote_logprobs=True) for f in folders
    ]
    others = [
        Request(p, greedy, compiled(llm, folders[0]), tenant=f"other-{i}")
        for i, p in enumerate(LONG_PROMPTS)
    ]
    run(llm, RequestGroup(voters, lockstep=False), others)
    assert sum(r.num_preemptions for r in [*voters, *others]) > 0
    for row, model, unpreempted in zip(voters, models, rows, strict=True):
        assert row.output_token_ids == peft_greedy(model, PROMPT, STEPS)
        assert len(row.output_logprobs) == STEPS
        # The same log-probabilities, to float error (other rows shared the forwards).
        assert row.output_logprobs == pytest.approx(unpreempted.output_logprobs, abs=1e-4)
    for request, long_prompt in zip(others, LONG_PROMPTS, strict=True):
        assert request.output_token_ids == peft_greedy(models[0], long_prompt, STEPS)


def test_seeded_ensembles_sample_the_same_preempted_or_not(tmp_path: Path) -> None:
    _, folders = members("llama", tmp_path, ["prefix", "prompt", "prefix"])
    seeded = SamplingParams(max_new_tokens=STEPS, temperature=1.0, top_k=40, seed=11)
    greedy = SamplingParams(max_new_tokens=STEPS, temperature=0)

    def ensemble(llm: LLM, lockstep: bool, crowded: bool) -> list[list[int]]:
        rows = [Request(PROMPT, seeded, compiled(llm, f), tenant="e") for f in folders]
        group = RequestGroup(rows, lockstep=lockstep)
        others = [
            Request(p, greedy, compiled(llm, folders[1]), tenant=f"other-{i}")
            for i, p in enumerate(LONG_PROMPTS if crowded else [])
        ]
        if others:
            run(llm, group, others)
            assert sum(r.num_preemptions for r in [*rows, *others]) > 0
        else:
            llm.add(group.leader)
            while llm.has_work:
                llm.step()
        return [r.output_token_ids for r in rows]

    for lockstep in (True, False):
        alone = ensemble(LLM(tiny_loaded("llama"), config()), lockstep, crowded=False)
        crowded = ensemble(small_pool(), lockstep, crowded=True)
        assert crowded == alone, lockstep
        if lockstep:
            assert all(tokens == alone[0] for tokens in alone)
        else:  # each member samples as it would alone, with the same seed
            for folder, tokens in zip(folders, alone, strict=True):
                llm = LLM(tiny_loaded("llama"), config())
                (single,) = llm.generate([Request(PROMPT, seeded, compiled(llm, folder))])
                assert single.output_token_ids == tokens


def test_a_group_waiting_for_slots_is_not_starved_by_another_tenants_stream_of_requests() -> None:
    """Bob always has a request waiting and his rows finish one at a time, so a slot frees now
    and then but never two at once: a group of two must still get its turn."""
    llm = LLM(tiny_loaded("llama"), config(num_slots=3))
    rows = [Request([4, 5], SamplingParams(max_new_tokens=3, temperature=0), tenant="alice")]
    rows.append(Request([4, 5], rows[0].sampling, tenant="alice"))
    lengths = iter([5, 6, 7] + [3] * 1000)

    def bobs_next() -> Request:
        sampling = SamplingParams(max_new_tokens=next(lengths), temperature=0, ignore_eos=True)
        return Request([1, 2, 3], sampling, tenant="bob")

    bobs = [bobs_next() for _ in range(4)]
    for request in bobs[:3]:
        llm.add(request)
    llm.step()  # bob holds every slot
    assert len(llm.running) == 3
    llm.add(RequestGroup(rows, lockstep=True).leader)
    llm.add(bobs[3])
    for _ in range(200):
        if rows[0].finished:
            break
        llm.step()
        waiting = sum(1 for r in bobs if r.status.value == "waiting")
        if not waiting:  # bob keeps one request queued
            bobs.append(bobs_next())
            llm.add(bobs[-1])
    assert rows[0].finish_reason == "length", "the group never got two slots at once"
    for _ in range(200):  # holding slots for the group held nobody else for good
        if not llm.has_work:
            break
        llm.step()
    assert all(r.finish_reason == "length" for r in [*bobs, *rows])


def test_ensembles_cancelled_mid_decode_or_while_preempted_release_every_row(
    tmp_path: Path,
) -> None:
    """A vote's streams dropped after their first tokens, and a mean dropped while the small
    pool keeps preempting it: every row leaves, every member's release runs once, and the pool
    holds nothing but unused resident prefixes."""
    _, folders = members("llama", tmp_path, ["prefix", "prompt", "prefix"])
    loaded = tiny_loaded("llama")
    spec = loaded.spec
    per_block = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * 4 * 4
    engine = Engine(
        loaded, config(max_len=48, max_step_tokens=13, kv_cache_bytes=41 * per_block)
    ).start()
    endless = SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True)
    released: Counter[str] = Counter()
    compiler = LLM(loaded, config())
    prefixes = [compiled(compiler, f) for f in folders]

    def member(name: str) -> tuple[CompiledPrefix, Callable[[], None]]:
        return prefixes[int(name[-1])], lambda: released.update([name])

    async def main() -> None:
        others = [
            engine.submit(p, endless, prefix=prefixes[0], tenant=f"other-{i}")
            for i, p in enumerate(LONG_PROMPTS)
        ]
        votes = engine.submit_group(
            PROMPT, endless, [member(f"vote{i}") for i in range(3)], tenant="v"
        )
        (mean,) = engine.submit_group(
            PROMPT, endless, [member(f"mean{i}") for i in range(3)], lockstep=True, tenant="m"
        )
        for stream in votes:
            async for _ in stream:
                break  # walks away after its first token: the row is cancelled
        got = 0
        async for chunk in mean:
            got += len(chunk.token_ids)
            if got >= 3 and mean.request.num_preemptions + sum(
                o.request.num_preemptions for o in others
            ):
                mean.cancel()
        assert mean.request.finish_reason in ("cancelled", "length")
        for other in others:
            await other.result()

    try:
        asyncio.run(main())
        assert released == Counter({f"{kind}{i}": 1 for kind in ("vote", "mean") for i in range(3)})
        scheduler = engine.core.scheduler
        assert engine.in_flight == 0 and not engine.core.running and scheduler.num_waiting == 0
        assert engine.waiting_per_tenant() == {}
        assert all(p.users == 0 for p in scheduler.prefixes.resident.values())
        assert scheduler.blocks_in_use == scheduler.prefixes.num_blocks
    finally:
        engine.stop()
