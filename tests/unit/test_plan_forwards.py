"""How one step's rows are grouped into forwards."""

from __future__ import annotations

from server.engine.packed import group_by_length
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


def test_rows_of_very_different_lengths_read_apart_and_close_ones_together() -> None:
    # Eight rows of 4 blocks (64 tokens) and one of 94 (1,500): two groups, each read to its own
    # longest; rows a block apart stay in one group (another group costs more than a block).
    blocks = [4] * 8 + [94]
    assert group_by_length(blocks, 16) == [list(range(8)), [8]]
    assert group_by_length([4, 5, 4, 5], 16) == [[0, 2, 1, 3]]
    assert group_by_length([7], 16) == [[0]]
