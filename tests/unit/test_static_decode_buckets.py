"""Buckets of the static decode path, what its buffers hold, and where it is chosen."""

from __future__ import annotations

import pytest
import torch

from server.config import Settings
from server.engine.blocks import SCRATCH_BLOCK, ZERO_BLOCK
from server.engine.config import EngineConfig
from server.engine.request import Request
from server.engine.scheduler import ScheduledRow
from server.engine.static_decode import (
    DecodeBuffers,
    StaticDecoder,
    batch_buckets,
    bucket,
    width_buckets,
)


def test_batch_buckets_double_up_to_the_slot_count() -> None:
    assert batch_buckets(1) == [1]
    assert batch_buckets(16) == [1, 2, 4, 8, 16]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]


def test_width_buckets_read_at_most_a_quarter_past_the_longest_table() -> None:
    widths = width_buckets(130, min_blocks=4)
    assert widths[0] == 4 and widths[-1] == 130
    assert widths[:9] == [4, 5, 6, 7, 8, 10, 12, 14, 16]
    for needed in range(1, 131):
        chosen = bucket(widths, needed)
        assert chosen is not None and chosen >= needed
        assert chosen <= max(4, needed * 1.25)
    assert bucket(widths, 131) is None


def decoding(tokens: list[int], table: list[int], cached: int) -> ScheduledRow:
    request = Request(tokens)
    request.block_table, request.num_cached = table, cached
    return ScheduledRow(request, 1)


def test_buffers_hold_each_rows_inputs_and_padding_rows_touch_only_reserved_blocks() -> None:
    buffers = DecodeBuffers(4, 3, torch.empty(4, 10))
    buffers.fill([decoding([5, 6, 7], [9, 4], cached=2), decoding([8], [3], cached=0)], 4)
    assert buffers.input_ids[:, 0].tolist() == [7, 8, 0, 0]
    assert buffers.positions[:, 0].tolist() == [2, 0, 0, 0]
    scratch = SCRATCH_BLOCK * 4
    assert buffers.write_slots.tolist() == [9 * 4 + 2, 3 * 4 + 0, scratch, scratch]
    zero = ZERO_BLOCK
    assert buffers.tables.tolist() == [[9, 4, zero], [3, zero, zero], [zero] * 3, [zero] * 3]
    # A later step with fewer rows leaves nothing of the earlier one behind.
    buffers.fill([decoding([1, 2], [6], cached=1)], 4)
    assert buffers.tables.tolist() == [[6, zero, zero], *[[zero] * 3] * 3]
    assert buffers.write_slots.tolist() == [6 * 4 + 1, scratch, scratch, scratch]


def test_only_pure_decode_forwards_that_fit_a_bucket_take_the_static_path() -> None:
    static = StaticDecoder(
        lambda buffers: buffers.logits,
        device=torch.device("cpu"), block_size=4, max_rows=4, max_blocks=3, vocab_size=10,
    )  # fmt: skip
    row = decoding([5, 6, 7], [9, 4], cached=2)
    assert static.key([row] * 3) == (4, 2)
    prefill = ScheduledRow(Request([1, 2, 3]), 3)
    assert static.key([row, prefill]) is None
    assert static.key([row] * 5) is None  # more rows than slots
    assert static.key([decoding([1] * 13, [2, 3, 4, 5], cached=12)]) is None  # too long


@pytest.mark.parametrize(
    ("device", "static", "graphs", "uses_static", "uses_graphs"),
    [
        ("cpu", None, True, False, False),
        ("cuda", None, True, True, True),
        ("cpu", True, True, True, False),
        ("cuda", None, False, True, False),
        ("cuda", False, True, False, False),
    ],
)
def test_static_decode_is_chosen_per_device_and_can_be_turned_off(
    device: str, static: bool | None, graphs: bool, uses_static: bool, uses_graphs: bool
) -> None:
    config = EngineConfig(static_decode=static, cuda_graphs=graphs)
    assert config.uses_static_decode(torch.device(device)) is uses_static
    assert config.uses_cuda_graphs(torch.device(device)) is uses_graphs


def test_settings_reach_the_engine_config() -> None:
    config = Settings(static_decode=True, cuda_graphs=False).engine_config()
    assert (config.static_decode, config.cuda_graphs) == (True, False)
    assert Settings().engine_config().static_decode is None
