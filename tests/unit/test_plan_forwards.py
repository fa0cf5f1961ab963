"""How one step's rows are grouped into forwards."""

from __future__ import annotations

from server.engine.request import Request
from server.engine.runner import plan_forwards


def req(tenant: str, prompt_len: int) -> Request:
    return Request([1] * prompt_len, tenant=tenant)


def test_plan_forwards_splits_decode_from_long_prefill() -> None:
    decode = [req("a", 1) for _ in range(15)]
    for r in decode:
        r.output_token_ids.append(1)
        r.num_cached = 1  # one pending token each
    newcomer = req("b", 48)
    groups = plan_forwards([*decode, newcomer], overhead_tokens=64)
    assert groups == [decode, [newcomer]]  # 16 * 48 padded tokens > 15 + 48 + 64
    short = req("c", 2)
    assert plan_forwards([*decode, short], overhead_tokens=64) == [[*decode, short]]
