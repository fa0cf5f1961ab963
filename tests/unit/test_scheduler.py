"""The scheduler: fair turns between tenants, caps, chunked prefill, shared prefix blocks,
preemption when blocks run out; and the admission gate's bounded queue."""

from __future__ import annotations

import pytest
import torch

from prefixes import CompiledPrefix, PrefixKind
from server.engine.config import EngineConfig
from server.engine.gate import AdmissionGate, Overloaded
from server.engine.request import Request, RequestStatus
from server.engine.scheduler import Schedule, Scheduler

BLOCK = 4


def req(tenant: str, prompt_len: int = 4, prefix: CompiledPrefix | None = None) -> Request:
    return Request([1] * prompt_len, tenant=tenant, prefix=prefix)


def prefix(tokens: int, digest: str) -> CompiledPrefix:
    return CompiledPrefix(PrefixKind.PREFIX_TUNING, torch.zeros(1, 2, 1, tokens, 2), digest)


def make(num_blocks: int = 1000, **config) -> Scheduler:
    config = {"max_running_per_tenant": 0, "block_size": BLOCK, **config}
    return Scheduler(EngineConfig(**config), num_blocks)


def run_step(scheduler: Scheduler, finish_after: int = 1 << 30) -> Schedule:
    """What the runner and the core do: advance every fed row, sample where the prompt is in,
    retire rows with `finish_after` output tokens."""
    plan = scheduler.schedule()
    for row in plan.rows:
        samples = row.samples
        row.request.num_cached += row.num_tokens
        if samples:
            row.request.output_token_ids.append(7)
    for row in plan.rows:
        if len(row.request.output_token_ids) >= finish_after:
            scheduler.retire(row.request)
    return plan


def steps_until_admitted(scheduler: Scheduler, target: Request) -> int:
    for step in range(1, 1000):
        if target in run_step(scheduler, finish_after=3).admitted:
            return step
    raise AssertionError("never admitted")


def test_a_flooding_tenant_delays_another_by_a_bounded_number_of_steps() -> None:
    scheduler = make(num_slots=4, max_running_per_tenant=3)
    for _ in range(200):
        scheduler.add(req("a"))
    assert steps_until_admitted(scheduler, scheduler.queues["a"][5]) > 1
    late = req("b")
    scheduler.add(late)
    # a holds at most 3 of 4 slots, and b's turn comes before a's next request.
    assert steps_until_admitted(scheduler, late) <= 2


def test_tenants_take_turns() -> None:
    scheduler = make(num_slots=4)
    for tenant in "aaaabc":
        scheduler.add(req(tenant))
    plan = scheduler.schedule()
    assert [r.tenant for r in plan.admitted] == ["a", "b", "c", "a"]
    assert [len(q) for q in scheduler.queues.values()] == [2]


def test_per_tenant_cap_leaves_slots_for_others() -> None:
    scheduler = make(num_slots=8, max_running_per_tenant=2)
    for _ in range(5):
        scheduler.add(req("a"))
    assert len(run_step(scheduler).admitted) == 2
    assert run_step(scheduler).admitted == []  # a is at its cap
    scheduler.add(req("b"))
    assert [r.tenant for r in run_step(scheduler).admitted] == ["b"]


def test_a_long_prompt_is_prefilled_in_chunks_while_running_rows_decode() -> None:
    scheduler = make(num_slots=4, max_step_tokens=10)
    decoding = [req("a", 3), req("b", 3)]
    for request in decoding:
        scheduler.add(request)
    run_step(scheduler)  # both prefill in one step
    long = req("c", 50)
    scheduler.add(long)
    chunks = []
    while long.num_cached < 50:
        plan = run_step(scheduler)
        fed = {id(row.request): row.num_tokens for row in plan.rows}
        assert all(fed[id(r)] == 1 for r in decoding)  # every step: their next token
        assert sum(fed.values()) <= 10
        chunks.append(fed[id(long)])
    assert chunks == [8] * 6 + [2]
    assert long.output_token_ids == [7]  # sampled once, after its last chunk
    assert len(long.block_table) == -(-51 // BLOCK)


def test_rows_with_one_prefix_share_its_full_blocks_and_copy_the_partial_one() -> None:
    scheduler = make(num_slots=4)
    shared = prefix(6, "p")  # one full block and 2 tokens of a second
    first, second = req("a", 1, shared), req("b", 1, shared)
    scheduler.add(first)
    scheduler.add(second)
    plan = scheduler.schedule()
    ((resident, _),) = plan.prefix_loads  # written once
    assert first.block_table[0] == second.block_table[0] == resident.blocks[0]
    assert first.block_table[1] != second.block_table[1] != resident.blocks[1]
    assert plan.block_copies == [
        (resident.blocks[1], first.block_table[1]),
        (resident.blocks[1], second.block_table[1]),
    ]
    assert scheduler.blocks_in_use == 2 + 2  # the prefix's two, one partial copy per row
    for request in (first, second):
        scheduler.retire(request)
    assert scheduler.blocks_in_use == scheduler.prefixes.num_blocks == 2  # stays resident
    again = req("c", 1, prefix(6, "p"))  # another handle on the same content
    scheduler.add(again)
    plan = scheduler.schedule()
    assert plan.prefix_loads == [] and again.block_table[0] == resident.blocks[0]


def test_an_unused_resident_prefix_is_evicted_when_blocks_are_needed() -> None:
    scheduler = make(num_blocks=2 + 4, num_slots=2)
    scheduler.add(req("a", 1, prefix(BLOCK * 2, "old")))
    run_step(scheduler, finish_after=1)
    assert scheduler.prefixes.num_blocks == 2
    newcomer = req("b", BLOCK * 3)  # needs 3 of the 4 blocks
    scheduler.add(newcomer)
    assert run_step(scheduler).admitted == [newcomer]
    assert "old" not in scheduler.prefixes.resident


def test_when_blocks_run_out_the_latest_row_is_preempted_and_recomputed_later() -> None:
    scheduler = make(num_blocks=2 + 4, num_slots=2)
    first, second = req("a", BLOCK - 1), req("b", BLOCK - 1)
    scheduler.add(first)
    scheduler.add(second)
    run_step(scheduler)  # positions 0..2: one block each
    plans = [run_step(scheduler) for _ in range(BLOCK + 2)]
    # Positions 4..7 take the last two blocks; position 8 of the first row needs a fifth.
    assert [p.preempted for p in plans] == [[]] * (BLOCK + 1) + [[second]]
    assert second.status is RequestStatus.WAITING and second.num_cached == 0
    assert scheduler.queues["b"][0] is second  # first in line again
    assert len(first.block_table) == 3
    while first.num_tokens < 4 * BLOCK - 1:
        run_step(scheduler)
    scheduler.retire(first)
    plan = run_step(scheduler)
    assert plan.admitted == [second]
    (row,) = plan.rows  # its prompt and its output so far, fed again, then it samples
    assert row.num_tokens == 3 + 6 and len(second.output_token_ids) == 7  # then sampled


def test_blocks_freed_last_are_handed_out_first_so_memory_follows_use() -> None:
    """Rows come and go one or two at a time in a large pool: they keep reusing the same few
    blocks (whose pages are already resident) instead of walking through the whole pool."""
    scheduler = make(num_slots=2)
    touched: set[int] = set()
    for _ in range(50):
        request = req("a", prompt_len=8)
        scheduler.add(request)
        plan = run_step(scheduler)
        touched.update(plan.zero_blocks)
        scheduler.retire(request)
    assert len(touched) <= 3  # 8 tokens of prompt + 1: three 4-token blocks, 50 times over


def test_a_newcomer_waits_for_blocks_instead_of_preempting() -> None:
    scheduler = make(num_blocks=2 + 2, num_slots=2)
    running = req("a", 2 * BLOCK - 1)
    scheduler.add(running)
    run_step(scheduler)
    newcomer = req("b", 1)
    scheduler.add(newcomer)
    plan = run_step(scheduler)
    assert plan.admitted == [] and plan.preempted == []
    scheduler.retire(running)
    assert run_step(scheduler).admitted == [newcomer]


def test_removing_a_waiting_or_running_request_frees_what_it_holds() -> None:
    scheduler = make()
    first, second = req("a"), req("a")
    scheduler.add(first)
    scheduler.add(second)
    assert scheduler.remove(first)
    assert not scheduler.remove(first)
    assert run_step(scheduler).admitted == [second]
    assert scheduler.remove(second)
    assert scheduler.blocks_in_use == 0 and not scheduler.has_work


def test_a_full_queue_raises_overloaded_with_a_retry_hint() -> None:
    gate = AdmissionGate(max_waiting=3, max_waiting_per_tenant=2)
    gate.enter("1", "a")
    gate.enter("2", "a")
    with pytest.raises(Overloaded, match="tenant 'a' has 2 requests waiting"):
        gate.enter("3", "a")
    gate.enter("3", "b")
    with pytest.raises(Overloaded) as caught:
        gate.enter("4", "c")
    assert 1 <= caught.value.retry_after <= 60
    assert "the server has 3 requests waiting" in str(caught.value)
    gate.dequeued("1", "a")  # admitted: no longer counts against the queue
    gate.enter("4", "c")
    assert gate.waiting_per_tenant() == {"a": 1, "b": 1, "c": 1} and gate.in_flight == 4


@pytest.mark.parametrize("field", ["num_slots", "max_waiting", "max_step_tokens", "block_size"])
def test_config_checks_itself(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        EngineConfig(**{field: 0})
