"""Prompt ensembles in the engine: one prompt under several prefixes, admitted together.

A vote group's rows decode on their own: each gives, token for token, what PEFT's `generate`
gives its prefix alone. A lockstep group ("mean") decodes as one: each token is the argmax of
the mean of its members' log-softmax, equal to a plain loop over the members' PEFT models. Other
tenants' requests in the same batch stay exact either way.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel

from prefixes import read_upload
from server.engine.config import EngineConfig
from server.engine.llm import LLM
from server.engine.request import InvalidRequest, Request, RequestGroup, SamplingParams
from tests.tiny import ADAPTER_KINDS, make_adapter, peft_greedy, tiny_loaded

NEW_TOKENS = 8
GREEDY = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0)


def config(**overrides) -> EngineConfig:
    return EngineConfig(
        **{"num_slots": 12, "max_len": 128, "block_size": 4, "max_running_per_tenant": 0,
           **overrides}
    )  # fmt: skip


def members(arch: str, tmp_path: Path, kinds: list[str]) -> tuple[list[PeftModel], list[Path]]:
    """One adapter per kind, different lengths and seeds, on the same tiny base model."""
    base = tiny_loaded(arch).model
    models, folders = [], []
    for i, kind in enumerate(kinds):
        folder = tmp_path / f"{kind}-{i}"
        models.append(make_adapter(base, kind, 3 + 2 * i, folder, seed=10 + i))
        folders.append(folder)
    return models, folders


def compiled(llm: LLM, folder: Path):
    return llm.compile(read_upload({p.name: p.read_bytes() for p in folder.iterdir()}))


def mean_reference(models: list[PeftModel], prompt: list[int], steps: int) -> list[int]:
    """The product-of-experts decode, written as plainly as possible: every step, every
    member's PEFT model over the whole sequence, log-softmax, mean, argmax."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.tensor([tokens])
            log_probs = [
                m(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].float()
                for m in models
            ]
            mean = torch.stack([lp.log_softmax(-1) for lp in log_probs]).mean(0)
            tokens.append(int(mean.argmax()))
    return tokens[len(prompt) :]


def bystanders(llm: LLM, models: list[PeftModel], folders: list[Path]) -> list[tuple]:
    """Other tenants' single-prefix requests with their PEFT tokens, to share the batch."""
    generator = torch.Generator().manual_seed(7)
    out = []
    for i, (model, folder) in enumerate(zip(models, folders, strict=True)):
        prompt = torch.randint(0, 384, (3 + 4 * i,), generator=generator).tolist()
        request = Request(prompt, GREEDY, compiled(llm, folder), tenant=f"other-{i}")
        out.append((request, peft_greedy(model, prompt, NEW_TOKENS)))
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral", "gpt2"])
def test_vote_members_each_match_peft_alone_beside_other_tenants(arch: str, tmp_path: Path) -> None:
    models, folders = members(arch, tmp_path, list(ADAPTER_KINDS))
    llm = LLM(tiny_loaded(arch), config())
    prompt = [5, 17, 42, 99, 3]
    rows = [
        Request(prompt, GREEDY, compiled(llm, f), tenant="voter", vote_logprobs=True)
        for f in folders
    ]
    group = RequestGroup(rows, lockstep=False)
    others = bystanders(llm, models[:2], folders[:2])
    for request, _ in others:
        llm.add(request)
    llm.add(group.leader)
    while llm.has_work:
        llm.step()
    for row, model in zip(rows, models, strict=True):
        assert row.output_token_ids == peft_greedy(model, prompt, NEW_TOKENS)
        assert len(row.output_logprobs) == NEW_TOKENS
        assert all(lp <= 0 for lp in row.output_logprobs)
    assert len({tuple(r.output_token_ids) for r in rows}) > 1  # the members do disagree
    for request, expected in others:
        assert request.output_token_ids == expected


def test_vote_logprobs_are_the_models_log_probabilities_of_the_chosen_tokens(
    tmp_path: Path,
) -> None:
    models, folders = members("llama", tmp_path, ["prefix", "prompt"])
    llm = LLM(tiny_loaded("llama"), config())
    prompt = [9, 8, 7]
    rows = [Request(prompt, GREEDY, compiled(llm, f), vote_logprobs=True) for f in folders]
    llm.add(RequestGroup(rows, lockstep=False).leader)
    while llm.has_work:
        llm.step()
    for row, model in zip(rows, models, strict=True):
        tokens = prompt + row.output_token_ids
        with torch.no_grad():
            ids = torch.tensor([tokens])
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float()
        log_probs = logits.log_softmax(-1)
        # Token i of the output was chosen after the sequence up to it.
        start = logits.shape[0] - len(tokens)  # prompt tuning returns virtual positions first
        expected = [
            float(log_probs[start + len(prompt) - 1 + i, t])
            for i, t in enumerate(row.output_token_ids)
        ]
        assert row.output_logprobs == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral", "gpt2"])
def test_mean_decodes_the_members_average_log_softmax_beside_other_tenants(
    arch: str, tmp_path: Path
) -> None:
    models, folders = members(arch, tmp_path, list(ADAPTER_KINDS))
    llm = LLM(tiny_loaded(arch), config())
    prompt = [5, 17, 42, 99, 3, 250]
    rows = [Request(prompt, GREEDY, compiled(llm, f), tenant="ensemble") for f in folders]
    group = RequestGroup(rows, lockstep=True)
    others = bystanders(llm, models[:3], folders[:3])
    llm.add(others[0][0])
    llm.add(group.leader)
    for request, _ in others[1:]:
        llm.add(request)
    while llm.has_work:
        llm.step()
    expected = mean_reference(models, prompt, NEW_TOKENS)
    assert group.leader.output_token_ids == expected
    assert all(row.output_token_ids == expected for row in rows)
    assert {row.finish_reason for row in rows} == {"length"}
    # The comparison has teeth: the mean is not any single member's answer.
    assert all(peft_greedy(m, prompt, NEW_TOKENS) != expected for m in models[:1])
    for request, want in others:
        assert request.output_token_ids == want


def test_mean_prefilled_in_chunks_and_preempted_still_matches(tmp_path: Path) -> None:
    models, folders = members("llama", tmp_path, ["prefix", "prompt", "prefix"])
    loaded = tiny_loaded("llama")
    # 13 tokens per step: the group's 12-token prompt is prefilled 4 tokens a row at a time;
    # a pool of 41 blocks holds the group (about 29 blocks at its end) or the two bystanders
    # (10 each), not all three.
    spec = loaded.spec
    per_block = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * 4 * 4
    llm = LLM(loaded, config(max_len=48, max_step_tokens=13, kv_cache_bytes=41 * per_block))
    prompt = torch.randint(0, 384, (12,), generator=torch.Generator().manual_seed(3)).tolist()
    long_prompts = [list(range(1, 21)), list(range(30, 50))]
    steps = 16
    sampling = SamplingParams(max_new_tokens=steps, temperature=0)
    others = [
        Request(p, sampling, compiled(llm, folders[0]), tenant=f"other-{i}")
        for i, p in enumerate(long_prompts)
    ]
    rows = [Request(prompt, sampling, compiled(llm, f), tenant="ensemble") for f in folders]
    group = RequestGroup(rows, lockstep=True)
    fed: list[dict[str, int]] = []
    run_step = llm.runner.step

    def recording_step(scheduled):
        fed.append({row.request.request_id: row.num_tokens for row in scheduled})
        return run_step(scheduled)

    llm.runner.step = recording_step  # type: ignore[method-assign]
    llm.add(others[0])
    llm.add(group.leader)
    llm.add(others[1])
    while llm.has_work:
        llm.step()
    # The group is always fed together, the same number of tokens per row.
    for step in fed:
        counts = {step[r.request_id] for r in rows if r.request_id in step}
        assert len(counts) <= 1 and (not counts or all(r.request_id in step for r in rows))
    assert max(step.get(rows[0].request_id, 0) for step in fed) < len(prompt)  # chunked
    assert sum(r.num_preemptions for r in [*rows, *others]) > 0
    assert rows[0].output_token_ids == mean_reference(models, prompt, steps)
    for request, long_prompt in zip(others, long_prompts, strict=True):
        assert request.output_token_ids == peft_greedy(models[0], long_prompt, steps)


def test_a_groups_rows_are_admitted_in_one_step_or_not_at_all() -> None:
    llm = LLM(tiny_loaded("llama"), config(num_slots=4))
    sampling = SamplingParams(max_new_tokens=3, temperature=0)
    running = [Request([1, 2, 3], sampling, tenant=f"t{i}") for i in range(2)]
    rows = [Request([4, 5], sampling, tenant="g") for _ in range(3)]
    group = RequestGroup(rows, lockstep=False)
    for request in running:
        llm.add(request)
    llm.add(group.leader)
    llm.step()
    # Two slots are free, the group needs three: none of its rows may start.
    assert [r for r in rows if r in llm.running] == []
    while any(r in llm.running for r in running) or not any(r in llm.running for r in rows):
        llm.step()
    assert all(r in llm.running for r in rows)
    while llm.has_work:
        llm.step()
    assert all(len(r.output_token_ids) == 3 for r in rows + running)


def test_a_group_counts_its_rows_against_the_tenants_cap() -> None:
    llm = LLM(tiny_loaded("llama"), config(num_slots=8, max_running_per_tenant=3))
    sampling = SamplingParams(max_new_tokens=4, temperature=0)
    own = Request([1, 2, 3], sampling, tenant="t")
    rows = [Request([4, 5], sampling, tenant="t") for _ in range(3)]
    llm.add(own)
    llm.add(RequestGroup(rows, lockstep=True).leader)
    while llm.has_work:
        llm.step()
        assert len([r for r in llm.running if r.tenant == "t"]) <= 3
        assert not (own in llm.running and rows[0] in llm.running)  # 1 + 3 rows > the cap
    assert all(r.output_token_ids == rows[0].output_token_ids for r in rows)
    too_many = [Request([4, 5], sampling, tenant="t") for _ in range(4)]
    with pytest.raises(InvalidRequest, match="expected at most 3 members"):
        llm.add(RequestGroup(too_many, lockstep=False).leader)


def test_a_group_the_kv_pool_cannot_hold_is_refused_before_it_queues() -> None:
    loaded = tiny_loaded("llama")
    spec = loaded.spec
    per_block = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * 4 * 4
    llm = LLM(loaded, config(max_len=64, kv_cache_bytes=40 * per_block))  # 38 usable blocks
    sampling = SamplingParams(max_new_tokens=4, temperature=0)
    rows = [Request([1, 2], sampling) for _ in range(3)]  # 3 rows of 17 blocks at most
    with pytest.raises(InvalidRequest, match="expected at most 2 members"):
        llm.add(RequestGroup(rows, lockstep=True).leader)
    assert not llm.has_work


def test_cancelling_one_row_of_a_lockstep_group_cancels_the_group() -> None:
    llm = LLM(tiny_loaded("llama"), config())
    sampling = SamplingParams(max_new_tokens=50, temperature=0)
    rows = [Request([4, 5, 6], sampling) for _ in range(3)]
    llm.add(RequestGroup(rows, lockstep=True).leader)
    llm.step()
    removed = llm.core.abort(rows[1])
    assert set(map(id, removed)) == set(map(id, rows))
    assert all(r.finish_reason == "cancelled" for r in rows) and not llm.has_work
    assert llm.core.scheduler.blocks_in_use == 0
