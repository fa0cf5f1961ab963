"""Scoring, exactly: prompt and generated log-probs equal the PEFT model's own log-softmax of the
same tokens, for the base model and every adapter kind, per row of a mixed batch whose prompts
are prefilled in chunks; penalties, logit bias and min_tokens give the tokens transformers' own
logits processors give on the PEFT model; `n` choices prefill their prompt once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
)

from prefixes import CompiledPrefix, read_upload
from server.engine.config import EngineConfig
from server.engine.llm import LLM
from server.engine.request import Request, RequestGroup, SamplingParams
from server.engine.scheduler import Schedule
from tests.tiny import ADAPTER_KINDS, log_probs_of, make_adapter, tiny_loaded

TOLERANCE = 1e-4
TOP = 5
# (the model's attention implementation, how the engine's attention reads the KV pool)
ATTENTION = [("sdpa", "gather"), ("eager", "gather"), ("sdpa", "paged")]


@dataclass
class Row:
    kind: str | None
    prompt: list[int]
    model: torch.nn.Module  # the PEFT model (or the base model) that is the reference
    adapter_dir: Path | None


def build_rows(arch: str, attn: str, tmp_path: Path) -> list[Row]:
    base = tiny_loaded(arch, attn).model
    generator = torch.Generator().manual_seed(3)
    rows = []
    for i, kind in enumerate([*ADAPTER_KINDS, None]):
        # Prompts longer than a step's 24 tokens: scored across chunk boundaries.
        prompt = torch.randint(0, 384, (9 + 11 * i,), generator=generator).tolist()
        if kind is None:
            rows.append(Row(None, prompt, base, None))
            continue
        adapter_dir = tmp_path / f"{kind}-{i}"
        model = make_adapter(base, kind, num_virtual_tokens=3 + 2 * i, out_dir=adapter_dir, seed=i)
        rows.append(Row(kind, prompt, model, adapter_dir))
    return rows


def compiled(llm: LLM, row: Row) -> CompiledPrefix | None:
    if row.adapter_dir is None:
        return None
    return llm.compile(read_upload({p.name: p.read_bytes() for p in row.adapter_dir.iterdir()}))


def reference_log_probs(row: Row, tokens: list[int]) -> torch.Tensor:
    return log_probs_of(row.model, tokens)


def assert_top(found: list[tuple[int, float]], expected: torch.Tensor) -> None:
    values, ids = expected.topk(len(found))
    assert [token for token, _ in found] == ids.tolist()
    assert torch.allclose(torch.tensor([lp for _, lp in found]), values, atol=TOLERANCE)


def scoring_config(kernel: str) -> EngineConfig:
    # 24 tokens a step at most: every prompt but the first is prefilled in several chunks.
    return EngineConfig(
        max_running_per_tenant=0,
        attention_kernel=kernel,  # type: ignore[arg-type]
        gap_target=None,
        max_step_tokens=24,
        num_slots=8,
    )


@pytest.mark.parametrize(("attn", "kernel"), ATTENTION)
def test_prompt_and_generated_log_probs_equal_the_peft_models_own(
    attn: str, kernel: str, tmp_path: Path
) -> None:
    rows = build_rows("llama", attn, tmp_path)
    llm = LLM(tiny_loaded("llama", attn), scoring_config(kernel), max_len=128)
    sampling = SamplingParams(max_new_tokens=4, temperature=0, logprobs=TOP, prompt_logprobs=TOP)
    requests = [Request(row.prompt, sampling, compiled(llm, row)) for row in rows]
    # Beside them, rows that ask for nothing, with the same prefixes.
    plain = [
        Request(row.prompt[:5], SamplingParams(max_new_tokens=6), compiled(llm, row))
        for row in rows
    ]
    llm.generate(requests + plain)

    for row, request in zip(rows, requests, strict=True):
        tokens = row.prompt + request.output_token_ids
        expected = reference_log_probs(row, tokens)
        prompt_len = len(row.prompt)
        assert len(request.prompt_logprobs) == prompt_len - 1
        for i, (logprob, top) in enumerate(request.prompt_logprobs):
            # prompt token i + 1, after the prefix and prompt tokens 0..i
            assert abs(logprob - expected[i, row.prompt[i + 1]].item()) < TOLERANCE, (row.kind, i)
            assert_top(top, expected[i])
        assert len(request.output_logprobs) == len(request.output_token_ids) == 4
        for k, token in enumerate(request.output_token_ids):
            position = prompt_len - 1 + k
            assert token == expected[position].argmax().item()  # greedy
            assert abs(request.output_logprobs[k] - expected[position, token].item()) < TOLERANCE
            assert_top(request.output_top_logprobs[k], expected[position])
    for request in plain:
        assert request.prompt_logprobs == [] and request.output_logprobs == []


def test_max_new_tokens_0_scores_the_prompt_and_generates_nothing(tmp_path: Path) -> None:
    (row,) = [r for r in build_rows("llama", "sdpa", tmp_path) if r.kind == "prefix"][:1]
    llm = LLM(tiny_loaded("llama"), scoring_config("gather"), max_len=128)
    request = Request(
        row.prompt, SamplingParams(max_new_tokens=0, prompt_logprobs=0), compiled(llm, row)
    )
    llm.generate([request])
    expected = reference_log_probs(row, row.prompt)
    assert request.output_token_ids == [] and request.finish_reason == "length"
    found = torch.tensor([lp for lp, _ in request.prompt_logprobs])
    wanted = expected[:-1].gather(1, torch.tensor(row.prompt[1:])[:, None])[:, 0]
    assert torch.allclose(found, wanted, atol=TOLERANCE)
    assert all(top == [] for _, top in request.prompt_logprobs)


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's frequency and presence penalties over the generated tokens (transformers has
    none): the reference for the engine's."""

    def __init__(self, prompt_len: int, frequency: float, presence: float) -> None:
        self.prompt_len, self.frequency, self.presence = prompt_len, frequency, presence

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        counts = torch.zeros_like(scores)
        generated = input_ids[:, self.prompt_len :]
        counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - counts * self.frequency - (counts > 0).to(scores.dtype) * self.presence


def transformers_tokens(
    model: torch.nn.Module, prompt: list[int], sampling: SamplingParams, stop_id: int | None
) -> list[int]:
    """Greedy `generate` with transformers' processors in the engine's order."""
    processors: list[LogitsProcessor] = []
    if sampling.logit_bias:
        processors.append(SequenceBiasLogitsProcessor([[[t], b] for t, b in sampling.logit_bias]))
    if sampling.min_tokens:
        assert stop_id is not None
        processors.append(
            MinNewTokensLengthLogitsProcessor(len(prompt), sampling.min_tokens, stop_id)
        )
    if sampling.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty))
    if sampling.frequency_penalty or sampling.presence_penalty:
        processors.append(
            OpenAIPenalties(len(prompt), sampling.frequency_penalty, sampling.presence_penalty)
        )
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(  # type: ignore[operator]
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=sampling.max_new_tokens,
            do_sample=False,
            logits_processor=LogitsProcessorList(processors),
            eos_token_id=stop_id,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def test_penalties_bias_and_min_tokens_per_row_equal_transformers_processors(
    tmp_path: Path,
) -> None:
    rows = build_rows("llama", "sdpa", tmp_path)
    llm = LLM(tiny_loaded("llama"), scoring_config("gather"), max_len=128)
    # Each row under other settings, all in one batch. Row 3's stop id is the token it would
    # choose first, so min_tokens is what keeps it going.
    first_choice = reference_log_probs(rows[3], rows[3].prompt)[-1].argmax().item()
    settings: list[tuple[SamplingParams, int | None]] = [
        (SamplingParams(max_new_tokens=10, temperature=0, repetition_penalty=1.8), None),
        (SamplingParams(max_new_tokens=10, temperature=0, frequency_penalty=1.5), None),
        (
            SamplingParams(
                max_new_tokens=10,
                temperature=0,
                presence_penalty=2.0,
                logit_bias=((7, 5.0), (11, -100.0)),
            ),
            None,
        ),
        (
            SamplingParams(
                max_new_tokens=10, temperature=0, min_tokens=6, stop_token_ids=(first_choice,)
            ),
            first_choice,
        ),
        (
            SamplingParams(
                max_new_tokens=10,
                temperature=0,
                repetition_penalty=0.7,
                frequency_penalty=-0.5,
                presence_penalty=0.3,
                logit_bias=((3, 2.5),),
                logprobs=2,
            ),
            None,
        ),
    ]
    requests = [
        Request(row.prompt, sampling, compiled(llm, row))
        for row, (sampling, _) in zip(rows, settings, strict=True)
    ]
    llm.generate(requests)
    for row, (sampling, stop_id), request in zip(rows, settings, requests, strict=True):
        expected = transformers_tokens(row.model, row.prompt, sampling, stop_id)
        assert request.output_token_ids == expected, (row.kind, sampling)
    assert len(requests[3].output_token_ids) > 6 or requests[3].output_token_ids[-1] == first_choice
    assert first_choice not in requests[3].output_token_ids[:6]
    # Log-probs are the model's own, before the bias and the penalties.
    last = requests[4]
    expected = reference_log_probs(rows[4], rows[4].prompt + last.output_token_ids)
    position = len(rows[4].prompt) - 1
    token = last.output_token_ids[0]
    assert abs(last.output_logprobs[0] - expected[position, token].item()) < TOLERANCE


def choices(
    llm: LLM, prompt: list[int], prefix: CompiledPrefix | None, n: int, sampling: SamplingParams
) -> list[Request]:
    from dataclasses import replace

    requests = [
        Request(
            prompt,
            sampling if sampling.seed is None else replace(sampling, seed=sampling.seed + i),
            prefix,
        )
        for i in range(n)
    ]
    RequestGroup(requests, lockstep=False, shares_prompt=True)
    return requests


def test_n_choices_prefill_their_prompt_once_and_match_one_request_each(tmp_path: Path) -> None:
    rows = build_rows("llama", "sdpa", tmp_path)
    row = rows[0]
    llm = LLM(tiny_loaded("llama"), scoring_config("gather"), max_len=128)
    prefix = compiled(llm, row)
    greedy = SamplingParams(max_new_tokens=6, temperature=0, prompt_logprobs=1)
    alone = Request(row.prompt, greedy, prefix)
    llm.generate([alone])

    before = llm.core.metrics.prefill_tokens
    group = choices(llm, row.prompt, prefix, 4, greedy)
    llm.add(group[0])
    while llm.has_work:
        llm.step()
    assert llm.core.metrics.prefill_tokens - before == len(row.prompt)  # once, for 4 choices
    for request in group:
        assert request.output_token_ids == alone.output_token_ids
        assert request.prompt_logprobs == alone.prompt_logprobs
    scheduler = llm.core.scheduler
    assert scheduler.blocks_in_use == scheduler.prefixes.num_blocks  # every block back

    seeded = SamplingParams(max_new_tokens=8, temperature=1.0, seed=5)
    runs = []
    for _ in range(2):
        group = choices(llm, row.prompt, prefix, 3, seeded)
        llm.add(group[0])
        while llm.has_work:
            llm.step()
        runs.append([r.output_token_ids for r in group])
    assert runs[0] == runs[1]  # reproducible with a seed
    assert len({tuple(tokens) for tokens in runs[0]}) > 1  # and the choices differ
    # Choice 0 is the one request with that seed.
    single = Request(row.prompt, seeded, prefix)
    llm.generate([single])
    assert single.output_token_ids == runs[0][0]


def test_a_shared_prompt_preempted_before_its_fork_runs_again_whole(tmp_path: Path) -> None:
    """A group waiting for its prompt goes back to the queue whole, and still prefills once
    per admission; every block comes back."""
    rows = build_rows("llama", "sdpa", tmp_path)
    llm = LLM(tiny_loaded("llama"), scoring_config("gather"), max_len=128)
    prefix = compiled(llm, rows[4])
    greedy = SamplingParams(max_new_tokens=5, temperature=0)
    alone = Request(rows[4].prompt, greedy, prefix)
    llm.generate([alone])
    group = choices(llm, rows[4].prompt, prefix, 3, greedy)
    llm.add(group[0])
    llm.step()  # the first chunk of the leader's prompt
    assert not group[0].group.forked  # type: ignore[union-attr]
    plan = llm.core.scheduler
    plan._preempt(group[0], Schedule())  # as the pool running dry would
    assert all(r.num_cached == 0 for r in group)
    while llm.has_work:
        llm.step()
    assert all(r.output_token_ids == alone.output_token_ids for r in group)
    assert plan.blocks_in_use == plan.prefixes.num_blocks


def test_a_mean_ensembles_log_probs_are_its_averaged_distributions(tmp_path: Path) -> None:
    """Its tokens come from the softmax of the members' mean log-softmax (under its penalties);
    its log-probs are that distribution's, before the penalties."""
    rows = build_rows("llama", "sdpa", tmp_path)[:3]
    llm = LLM(tiny_loaded("llama"), scoring_config("gather"), max_len=128)
    prompt = rows[0].prompt
    sampling = SamplingParams(
        max_new_tokens=6, temperature=0, logprobs=3, repetition_penalty=1.3, logit_bias=((9, 1.5),)
    )
    members = [Request(prompt, sampling, compiled(llm, row)) for row in rows]
    group = RequestGroup(members, lockstep=True)
    llm.add(group.leader)
    while llm.has_work:
        llm.step()
    leader = group.leader
    tokens = prompt + leader.output_token_ids
    mean = torch.stack([reference_log_probs(row, tokens) for row in rows]).mean(dim=0)
    averaged = mean.log_softmax(dim=-1)
    for k, token in enumerate(leader.output_token_ids):
        position = len(prompt) - 1 + k
        assert abs(leader.output_logprobs[k] - averaged[position, token].item()) < TOLERANCE
        assert_top(leader.output_top_logprobs[k], averaged[position])
        # the token: the argmax of the averaged distribution after the bias and the penalty
        scores = averaged[position].clone()
        scores[9] += 1.5
        seen = torch.tensor(sorted(set(tokens[: len(prompt) + k])))
        picked = scores[seen]
        scores[seen] = torch.where(picked < 0, picked * 1.3, picked / 1.3)
        assert token == scores.argmax().item()


def test_a_prompt_scored_across_a_preemption_is_scored_once(tmp_path: Path) -> None:
    rows = build_rows("llama", "sdpa", tmp_path)
    row = rows[4]  # the longest prompt: several chunks
    llm = LLM(tiny_loaded("llama"), scoring_config("gather"), max_len=128)
    request = Request(
        row.prompt,
        SamplingParams(max_new_tokens=2, temperature=0, prompt_logprobs=2),
        compiled(llm, row),
    )
    llm.add(request)
    llm.step()
    llm.step()  # two chunks in: some of the prompt is scored
    assert 0 < len(request.prompt_logprobs) < len(row.prompt) - 1
    scheduler = llm.core.scheduler
    scheduler._preempt(request, Schedule())  # as the pool running dry would
    while llm.has_work:
        llm.step()
    expected = reference_log_probs(row, row.prompt)
    assert len(request.prompt_logprobs) == len(row.prompt) - 1
    for i, (logprob, top) in enumerate(request.prompt_logprobs):
        assert abs(logprob - expected[i, row.prompt[i + 1]].item()) < TOLERANCE
        assert_top(top, expected[i])


def test_every_kind_under_every_penalty_at_once_equals_transformers_processors(
    tmp_path: Path,
) -> None:
    """The repetition penalty counts the prompt's tokens for every kind of prefix, as the
    processors do on PEFT's generate (soft prompts included: their virtual tokens are not
    tokens of the text)."""
    rows = build_rows("llama", "sdpa", tmp_path)
    llm = LLM(tiny_loaded("llama"), scoring_config("gather"), max_len=128)
    sampling = SamplingParams(
        max_new_tokens=10,
        temperature=0,
        repetition_penalty=1.6,
        frequency_penalty=0.4,
        presence_penalty=0.2,
        logit_bias=((5, 1.0),),
    )
    requests = [Request(row.prompt, sampling, compiled(llm, row)) for row in rows]
    llm.generate(requests)
    for row, request in zip(rows, requests, strict=True):
        expected = transformers_tokens(row.model, row.prompt, sampling, None)
        assert request.output_token_ids == expected, row.kind


def test_a_leader_failing_before_its_fork_fails_its_choices_and_frees_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its choices have nothing to fork from: they fail with it, their blocks come back, and
    a row beside them is untouched."""
    rows = build_rows("llama", "sdpa", tmp_path)
    llm = LLM(tiny_loaded("llama"), scoring_config("gather"), max_len=128)
    greedy = SamplingParams(max_new_tokens=4, temperature=0)
    victim_alone = Request(rows[0].prompt, greedy, compiled(llm, rows[0]))
    llm.generate([victim_alone])
    group = choices(llm, rows[4].prompt, compiled(llm, rows[4]), 3, greedy)  # several chunks
    leader = group[0]
    step = llm.runner.step

    def failing_step(scheduled: Any) -> Any:
        if any(r.request is leader and not r.samples for r in scheduled):
            raise RuntimeError("the leader's chunk fails")
        return step(scheduled)

    monkeypatch.setattr(llm.runner, "step", failing_step)
    victim = Request(rows[0].prompt, greedy, compiled(llm, rows[0]))
    llm.add(victim)
    llm.add(leader)
    for _ in range(50):  # a few steps do it all; choices left waiting would hold on forever
        if not llm.has_work:
            break
        llm.step()
    assert not llm.has_work
    assert [r.finish_reason for r in group] == ["error"] * 3
    assert all(r.output_token_ids == [] for r in group)
    assert victim.output_token_ids == victim_alone.output_token_ids
    scheduler = llm.core.scheduler
    assert scheduler.running == [] and scheduler.blocks_in_use == scheduler.prefixes.num_blocks
    assert llm.core.abort(group[1]) == []  # already gone: nothing to do, nothing raised


def test_a_lockstep_group_asked_for_no_tokens_generates_none(tmp_path: Path) -> None:
    rows = build_rows("llama", "sdpa", tmp_path)[:2]
    llm = LLM(tiny_loaded("llama"), scoring_config("gather"), max_len=128)
    sampling = SamplingParams(max_new_tokens=0, prompt_logprobs=0)
    members = [Request(rows[0].prompt, sampling, compiled(llm, row)) for row in rows]
    llm.add(RequestGroup(members, lockstep=True).leader)
    while llm.has_work:
        llm.step()
    assert [m.output_token_ids for m in members] == [[], []]
    assert [m.finish_reason for m in members] == ["length", "length"]
