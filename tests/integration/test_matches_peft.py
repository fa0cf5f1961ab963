"""Mixed batches give, row for row, the greedy tokens PEFT's `generate` gives each request alone,
with transformers' sdpa or eager attention on gathered rows, or the engine's attention reading
the KV pool in place ("paged", which needs sdpa)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from prefixes import CompiledPrefix, read_upload
from server.engine import packed
from server.engine.config import EngineConfig
from server.engine.kv_cache import GroupedRead
from server.engine.llm import LLM
from server.engine.request import Request, SamplingParams
from server.engine.scheduler import ScheduledRow
from tests.tiny import ADAPTER_KINDS, base_greedy, make_adapter, peft_greedy, tiny_loaded

NEW_TOKENS = 8
# (the model's attention implementation, how the engine's attention reads the KV pool)
ATTENTION = [("sdpa", "gather"), ("eager", "gather"), ("sdpa", "paged")]


@dataclass
class Case:
    kind: str | None
    prompt: list[int]
    expected: list[int]
    adapter_dir: Path | None


def build_cases(arch: str, attn: str, tmp_path: Path) -> list[Case]:
    """Every PEFT kind (prefix tuning twice, with different T) plus two rows with no prefix."""
    base = tiny_loaded(arch, attn).model
    generator = torch.Generator().manual_seed(1)
    kinds: list[str | None] = [*ADAPTER_KINDS, "prefix", None, None]
    cases = []
    for i, kind in enumerate(kinds):
        prompt = torch.randint(0, 384, (2 + 3 * i,), generator=generator).tolist()
        if kind is None:
            cases.append(Case(None, prompt, base_greedy(base, prompt, NEW_TOKENS), None))
            continue
        adapter_dir = tmp_path / f"{kind}-{i}"
        peft_model = make_adapter(
            base, kind, num_virtual_tokens=3 + 2 * i, out_dir=adapter_dir, seed=i
        )
        cases.append(Case(kind, prompt, peft_greedy(peft_model, prompt, NEW_TOKENS), adapter_dir))
    return cases


def load(llm: LLM, case: Case) -> CompiledPrefix | None:
    if case.adapter_dir is None:
        return None
    files = {p.name: p.read_bytes() for p in case.adapter_dir.iterdir()}
    return llm.compile(read_upload(files))


def engine_config(kernel: str) -> EngineConfig:
    return EngineConfig(max_running_per_tenant=0, attention_kernel=kernel)  # type: ignore[arg-type]


def greedy(case: Case, prefix: CompiledPrefix | None) -> Request:
    return Request(case.prompt, SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0), prefix)


@pytest.mark.parametrize(("attn", "kernel"), ATTENTION)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral", "gpt2"])
def test_joint_prefill_of_mixed_prefixes_matches_peft(
    arch: str, attn: str, kernel: str, tmp_path: Path
) -> None:
    cases = build_cases(arch, attn, tmp_path)
    llm = LLM(tiny_loaded(arch, attn), engine_config(kernel), num_slots=len(cases), max_len=128)
    requests = [greedy(case, load(llm, case)) for case in cases]
    assert len({r.prefix_len for r in requests}) >= 5  # different prefix lengths share the batch

    llm.generate(requests)

    for case, request in zip(cases, requests, strict=True):
        assert request.output_token_ids == case.expected, case.kind
        assert request.finish_reason == "length"
    # The comparison has teeth: every prefix changes what the model says for its prompt.
    base = llm.loaded.model
    for case in cases[:-2]:
        assert base_greedy(base, case.prompt, NEW_TOKENS) != case.expected, case.kind


@pytest.mark.parametrize("forwards", ["joint", "split", "split, keys read in buckets of 64"])
@pytest.mark.parametrize(("attn", "kernel"), ATTENTION)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_requests_joining_mid_decode_into_reused_slots_match_peft(
    arch: str, attn: str, kernel: str, forwards: str, tmp_path: Path
) -> None:
    cases = build_cases(arch, attn, tmp_path)
    # Fewer slots than requests: later requests take slots that earlier ones filled and left,
    # and they prefill in the same step as rows that are decoding: in one padded forward
    # ("joint") or in a forward of their own ("split").
    llm = LLM(tiny_loaded(arch, attn), engine_config(kernel), num_slots=3, max_len=128)
    llm.runner.forward_overhead_tokens = 10_000 if forwards == "joint" else -10_000
    if "buckets" in forwards:  # what GPUs do: a masked tail of stale keys must change nothing
        llm.runner.kv_len_bucket = 64
    requests = [greedy(case, load(llm, case)) for case in cases]
    phases_per_step: list[set[bool]] = []
    run_step = llm.runner.step

    def recording_step(batch: list[ScheduledRow]) -> list[int | None]:
        phases_per_step.append({row.num_tokens > 1 for row in batch})
        return run_step(batch)

    llm.runner.step = recording_step  # type: ignore[method-assign]
    llm.add(requests[0])
    llm.step()
    llm.step()
    for request in requests[1:]:
        llm.add(request)
    while llm.has_work:
        llm.step()

    assert {True, False} in phases_per_step  # some forwards held prefill and decode rows
    scheduler = llm.core.scheduler  # every block came back, but the resident prefixes'
    assert not llm.running and scheduler.blocks_in_use == scheduler.prefixes.num_blocks
    for case, request in zip(cases, requests, strict=True):
        assert request.output_token_ids == case.expected, case.kind


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_rows_that_read_their_blocks_group_by_group_match_peft(
    arch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows of different lengths read only their own blocks, group by group (free groups:
    each length its own), in prefill and decode alike, and stay exact."""
    monkeypatch.setattr(packed, "GROUP_OVERHEAD_POSITIONS", 0)
    cases = build_cases(arch, "sdpa", tmp_path)
    config = EngineConfig(max_running_per_tenant=0, block_size=4)
    llm = LLM(tiny_loaded(arch), config, num_slots=len(cases), max_len=128)
    groups_per_forward: list[int] = []
    read_grouped = llm.runner.cache.read_grouped

    def recording(read: GroupedRead) -> None:
        groups_per_forward.append(len(read.groups))
        read_grouped(read)

    llm.runner.cache.read_grouped = recording  # type: ignore[method-assign]
    requests = [greedy(case, load(llm, case)) for case in cases]
    llm.generate(requests)

    assert max(groups_per_forward) >= 4
    for case, request in zip(cases, requests, strict=True):
        assert request.output_token_ids == case.expected, case.kind


def test_prefix_is_exact_wherever_its_slot_was_dirty(tmp_path: Path) -> None:
    """A slot's old contents (a longer prefix, a longer prompt) never leak into its next user."""
    cases = build_cases("llama", "sdpa", tmp_path)
    llm = LLM(tiny_loaded("llama"), num_slots=1, max_len=128)
    for case in sorted(cases, key=lambda c: -len(c.prompt)):  # longest first: most garbage left
        (request,) = llm.generate([greedy(case, load(llm, case))])
        assert request.output_token_ids == case.expected, case.kind
