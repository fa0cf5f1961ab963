"""Admission policy: fair turns between tenants, caps, budgets, a bounded queue."""

from __future__ import annotations

import pytest
import torch

from prefixes import CompiledPrefix, PrefixKind
from server.engine.request import Request
from server.engine.scheduler import Overloaded, Scheduler, SchedulerConfig


def req(tenant: str, prompt_len: int = 4, prefix: CompiledPrefix | None = None) -> Request:
    return Request([1] * prompt_len, tenant=tenant, prefix=prefix)


def run_until_admitted(scheduler: Scheduler, target: Request, slots: int) -> int:
    """Simulate steps in which each running row finishes after 3 steps; return steps taken."""
    running: list[tuple[Request, int]] = []
    for step in range(1, 1000):
        admitted = scheduler.admit(slots - len(running), [r for r, _ in running])
        if target in admitted:
            return step
        running = [(r, age + 1) for r, age in running] + [(r, 0) for r in admitted]
        for r, age in running:
            if age >= 3:
                scheduler.finished(r)
        running = [(r, age) for r, age in running if age < 3]
    raise AssertionError("never admitted")


def test_a_flooding_tenant_delays_another_by_a_bounded_number_of_steps() -> None:
    scheduler = Scheduler(SchedulerConfig(num_slots=4, max_waiting=1000, max_running_per_tenant=3))
    for _ in range(200):
        scheduler.add(req("a"))
    steps_a = run_until_admitted(scheduler, scheduler.queues["a"][5], slots=4)
    late = req("b")
    scheduler.add(late)
    # a holds at most 3 of 4 slots, and b's turn comes before a's next request.
    assert run_until_admitted(scheduler, late, slots=4) <= 2
    assert steps_a > 1


def test_tenants_take_turns() -> None:
    scheduler = Scheduler(SchedulerConfig(num_slots=6, max_running_per_tenant=0))
    for tenant in "aaaabc":
        scheduler.add(req(tenant))
    admitted = scheduler.admit(4, [])
    assert [r.tenant for r in admitted] == ["a", "b", "c", "a"]
    assert scheduler.waiting_per_tenant() == {"a": 2}


def test_per_tenant_cap_leaves_slots_for_others() -> None:
    scheduler = Scheduler(SchedulerConfig(num_slots=8, max_running_per_tenant=2))
    for _ in range(5):
        scheduler.add(req("a"))
    assert len(scheduler.admit(8, [])) == 2
    assert scheduler.admit(6, []) == []  # a is at its cap
    scheduler.add(req("b"))
    assert [r.tenant for r in scheduler.admit(6, [])] == ["b"]


def test_prefill_budget_caps_prompt_tokens_per_step_but_never_starves_a_long_prompt() -> None:
    scheduler = Scheduler(SchedulerConfig(max_prefill_tokens=10, max_running_per_tenant=0))
    long, short1, short2 = req("a", 50), req("b", 6), req("c", 6)
    for r in (long, short1, short2):
        scheduler.add(r)
    assert scheduler.admit(8, []) == [long]  # first of the step: admitted despite the cap
    assert scheduler.admit(8, []) == [short1]  # 6 + 6 > 10
    assert scheduler.admit(8, []) == [short2]


def test_prefix_bytes_budget_counts_distinct_prefixes() -> None:
    kv = torch.zeros(1, 2, 1, 4, 8)  # 256 bytes
    # Two requests pinning one version hold two CompiledPrefix objects over the pool's one
    # tensor: counted once. Another version is another tensor.
    p1, p1_again = (CompiledPrefix(PrefixKind.PREFIX_TUNING, kv) for _ in range(2))
    p2 = CompiledPrefix(PrefixKind.PREFIX_TUNING, kv.clone())
    scheduler = Scheduler(SchedulerConfig(max_prefix_bytes=300, max_running_per_tenant=0))
    a, b, c = req("a", prefix=p1), req("b", prefix=p1_again), req("c", prefix=p2)
    for r in (a, b, c):
        scheduler.add(r)
    assert scheduler.admit(8, []) == [a, b]  # p1 is shared; p2 would exceed 300 bytes
    assert scheduler.admit(8, []) == [c]  # nothing running: always room for one


def test_full_queue_raises_overloaded_with_a_retry_hint() -> None:
    scheduler = Scheduler(SchedulerConfig(max_waiting=3))
    for _ in range(3):
        scheduler.add(req("a"))
    with pytest.raises(Overloaded) as caught:
        scheduler.add(req("b"))
    assert 1 <= caught.value.retry_after <= 60
    assert "3 requests waiting" in str(caught.value)


def test_removing_a_waiting_request() -> None:
    scheduler = Scheduler(SchedulerConfig())
    first, second = req("a"), req("a")
    scheduler.add(first)
    scheduler.add(second)
    assert scheduler.remove_waiting(first)
    assert not scheduler.remove_waiting(first)
    assert scheduler.admit(4, []) == [second]
    assert scheduler.num_waiting == 0 and not scheduler.turns


@pytest.mark.parametrize("field", ["num_slots", "max_waiting", "max_prefill_tokens"])
def test_config_checks_itself(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SchedulerConfig(**{field: 0})
