"""How one step's rows are grouped into forwards."""

from __future__ import annotations

from server.engine.request import Request
from server.engine.scheduler import ScheduledRow
from server.engine.step_cost import plan_forwards


def row(tenant: str, num_tokens: int) -> ScheduledRow:
    return ScheduledRow(Request([1] * num_tokens, tenant=tenant), num_tokens)


def test_plan_forwards_splits_decode_from_long_prefill() -> None:
    decode = [row("a", 1) for _ in range(15)]
    newcomer = row("b", 48)
    groups = plan_forwards([*decode, newcomer], overhead_tokens=64)
    assert groups == [decode, [newcomer]]  # 16 * 48 padded tokens > 15 + 48 + 64
    short = row("c", 2)
    assert plan_forwards([*decode, short], overhead_tokens=64) == [[*decode, short]]
