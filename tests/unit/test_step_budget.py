"""The step budget follows a cost model: prompts take the whole step when nobody decodes, and
only what fits in the gap target beside decoding rows; the cost model fits what it measures."""

from __future__ import annotations

import pytest

from server.engine.config import EngineConfig
from server.engine.request import Request
from server.engine.scheduler import Schedule, Scheduler
from server.engine.step_cost import RowShape, StepCost, max_chunk, step_features

BLOCK = 4


class FakeCost:
    """A step costs 10 per forward, 1 per token fed: as a device's cost model would say."""

    def __init__(self) -> None:
        self.asked: list[list[RowShape]] = []

    def seconds(self, rows) -> float:
        self.asked.append(list(rows))
        forwards, tokens, _, _ = step_features(rows, overhead_tokens=10)
        return 10 * forwards + tokens


def make(cost: FakeCost | None, **config) -> Scheduler:
    config = {"max_running_per_tenant": 0, "block_size": BLOCK, "num_slots": 8, **config}
    return Scheduler(EngineConfig(**config), 1000, cost)


def run_step(scheduler: Scheduler) -> Schedule:
    plan = scheduler.schedule()
    for row in plan.rows:
        samples = row.samples
        row.request.num_cached += row.num_tokens
        if samples:
            row.request.output_token_ids.append(7)
    return plan


def fed(plan: Schedule) -> dict[int, int]:
    return {id(row.request): row.num_tokens for row in plan.rows}


def test_with_nobody_decoding_several_whole_prompts_share_one_step() -> None:
    scheduler = make(FakeCost())
    prompts = [Request([1] * 300, tenant=f"t{i}") for i in range(3)]
    for request in prompts:
        scheduler.add(request)
    plan = run_step(scheduler)
    assert fed(plan) == {id(r): 300 for r in prompts}  # 900 tokens: one forward, no chunks


def test_max_step_tokens_still_bounds_a_step_with_nobody_decoding() -> None:
    scheduler = make(FakeCost(), max_step_tokens=100)
    long = Request([1] * 300)
    scheduler.add(long)
    assert fed(run_step(scheduler)) == {id(long): 100}


def test_beside_decoding_rows_a_step_takes_what_fits_in_the_gap_target() -> None:
    cost = FakeCost()
    scheduler = make(cost, gap_target=3.0)
    streaming = [Request([1] * 8, tenant=f"s{i}") for i in range(4)]
    for request in streaming:
        scheduler.add(request)
    run_step(scheduler)  # their prompts, whole
    long = Request([1] * 1000, tenant="long")
    scheduler.add(long)
    plan = run_step(scheduler)
    decode_only = cost.seconds([RowShape(1, 9)] * 4)  # 10 + 4 tokens
    chunk = fed(plan)[id(long)]
    assert all(fed(plan)[id(r)] == 1 for r in streaming)
    step = cost.seconds([RowShape(1, 10)] * 4 + [RowShape(chunk, chunk)])
    assert step <= 3.0 * decode_only  # within the target...
    assert cost.seconds([RowShape(1, 10)] * 4 + [RowShape(chunk + 1, chunk + 1)]) > 3 * 14
    assert chunk > 1  # ...and as much of it as fits (here 2 forwards: 20 + 4 + chunk <= 42)
    assert chunk == 18


def test_a_larger_target_takes_more_of_a_prompt_per_step() -> None:
    chunks = {}
    for target in (2.0, 6.0):
        scheduler = make(FakeCost(), gap_target=target)
        scheduler.add(Request([1] * 8, tenant="streaming"))
        run_step(scheduler)
        long = Request([1] * 1000, tenant="long")
        scheduler.add(long)
        chunks[target] = fed(run_step(scheduler))[id(long)]
    assert chunks[6.0] > chunks[2.0] > 0


def test_prompts_always_advance_even_when_the_model_says_nothing_fits() -> None:
    scheduler = make(FakeCost(), gap_target=1.0)  # no room at all beside the decode
    scheduler.add(Request([1] * 8, tenant="streaming"))
    run_step(scheduler)
    long = Request([1] * 100, tenant="long")
    scheduler.add(long)
    assert fed(run_step(scheduler))[id(long)] == BLOCK  # one block of progress per step


def test_many_rows_waiting_for_a_first_token_widen_the_step() -> None:
    """One row streams while seven prompts wait: the step's target grows sevenfold, so the
    seven are not held to what suits the one that arrived first."""
    chunks = {}
    for waiting in (1, 7):
        scheduler = make(FakeCost(), gap_target=3.0)
        scheduler.add(Request([1] * 8, tenant="streaming"))
        run_step(scheduler)
        prompts = [Request([1] * 1000, tenant=f"w{i}") for i in range(waiting)]
        for request in prompts:
            scheduler.add(request)
        chunks[waiting] = sum(fed(run_step(scheduler)).get(id(r), 0) for r in prompts)
    assert chunks[7] > 4 * chunks[1]


def test_a_flooding_tenant_widens_the_step_no_more_than_its_cap_allows() -> None:
    """Another tenant streams; a tenant queues 200 prompts but may run 2 rows: the step widens
    as for 2 waiting rows, not 200."""
    chunks = {}
    for flood in (2, 200):
        scheduler = make(FakeCost(), gap_target=3.0, max_running_per_tenant=2)
        streaming = [Request([1] * 8, tenant="victim") for _ in range(2)]
        for request in streaming:
            scheduler.add(request)
        run_step(scheduler)
        for _ in range(flood):
            scheduler.add(Request([1] * 1000, tenant="flood"))
        chunks[flood] = sum(n for n in fed(run_step(scheduler)).values() if n > 1)
    assert chunks[200] == chunks[2]


def test_without_a_cost_model_tokens_alone_bound_a_step() -> None:
    scheduler = make(None, max_step_tokens=50)
    scheduler.add(Request([1] * 8, tenant="streaming"))
    run_step(scheduler)
    long = Request([1] * 1000, tenant="long")
    scheduler.add(long)
    assert fed(run_step(scheduler))[id(long)] == 49  # 50 less the decode token


def test_the_cost_model_recovers_the_costs_it_is_fitted_on() -> None:
    truth = (0.05, 0.002, 1e-7, 3e-6)  # per forward, token, attention pair, position read
    shapes = [
        [RowShape(1, 32)],
        [RowShape(1, 32)] * 16,
        [RowShape(1, 1024)] * 8,
        [RowShape(256, 256)],
        [RowShape(256, 1024)],
        [RowShape(64, 64)] * 4,
        [RowShape(1, 32)] * 7 + [RowShape(256, 256)],
    ]

    def true_seconds(rows: list[RowShape]) -> float:
        return sum(c * f for c, f in zip(truth, step_features(rows), strict=True))

    cost = StepCost([(rows, true_seconds(rows)) for rows in shapes])
    assert cost.coefficients == pytest.approx(truth, rel=1e-6)
    unseen = [RowShape(1, 700)] * 3 + [RowShape(100, 400)]
    assert cost.seconds(unseen) == pytest.approx(true_seconds(unseen), rel=1e-6)


def test_the_cost_model_refits_from_the_steps_it_observes() -> None:
    """A machine that got twice as slow (another process on its cores): after a window of
    observed steps the model says so, and the budget shrinks with it."""
    shapes = [[RowShape(1, 32)], [RowShape(1, 32)] * 8, [RowShape(128, 128)], [RowShape(64, 512)]]
    cost = StepCost([(rows, 0.01 + 0.001 * sum(n for n, _ in rows)) for rows in shapes],
                    refit_every=4, window=64)  # fmt: skip
    before = cost.seconds([RowShape(128, 128)])
    for _ in range(64):
        for rows in shapes:
            cost.observe(rows, 2 * (0.01 + 0.001 * sum(n for n, _ in rows)))
    assert cost.seconds([RowShape(128, 128)]) > 1.5 * before
    assert all(c >= 0 for c in cost.coefficients)


def test_no_coefficient_is_ever_negative() -> None:
    """Noisy steps whose best unconstrained fit has a negative cost must not make the budget
    believe a longer chunk is cheaper."""
    samples = [([RowShape(1, 10)], 0.10), ([RowShape(1, 10)] * 8, 0.09), ([RowShape(64, 64)], 0.3)]
    cost = StepCost(samples)
    assert all(c >= 0 for c in cost.coefficients)
    assert cost.seconds([RowShape(100, 100)]) >= cost.seconds([RowShape(50, 50)])


def test_a_packed_step_counts_each_token_once_in_one_forward() -> None:
    """Six decoding rows beside a 54-token chunk: packed, one forward of 60 tokens; padded,
    either 7 x 54 tokens or a second forward."""
    rows = [RowShape(1, 40)] * 6 + [RowShape(54, 500)]
    assert step_features(rows, packed=True) == (1.0, 60.0, 6 * 40 + 54 * 500, 6 * 40 + 500)
    forwards, tokens, _, _ = step_features(rows, overhead_tokens=64)
    assert (forwards, tokens) == (2.0, 6 + 54)  # split: 60 + 64 overhead < 7 * 54
    forwards, tokens, _, _ = step_features(rows, overhead_tokens=1000)
    assert (forwards, tokens) == (1.0, 7 * 54)


def test_max_chunk_is_the_largest_that_fits() -> None:
    cost = FakeCost()
    planned = [RowShape(1, 10)] * 2
    chunk = max_chunk(cost, planned, [0], most=500, limit=100.0)
    assert cost.seconds([*planned, RowShape(chunk, chunk)]) <= 100
    assert cost.seconds([*planned, RowShape(chunk + 1, chunk + 1)]) > 100
    assert max_chunk(cost, planned, [0], most=5, limit=100.0) == 5
