"""A step's rows packed into one sequence: every fed token once, no padding.

A padded forward feeds every row the longest chunk's length: six decoding rows beside a 54-token
prompt chunk cost 7 x 54 tokens of every matmul, or, run apart, a second forward that reads
every weight again (on the CPU here a 54-token chunk beside six rows cost 235 ms that way, 4.3 ms
a token, against 3.1 ms a token for the same prompt prefilled alone). Packed, the decoder sees
one sequence of exactly the fed tokens (batch 1), each at its own position, and only attention
tells the rows apart: the engine's sdpa (attention.py) runs it group by group, each group the
rows of one chunk length whose block tables are cut at about the same length
(`group_by_length`), against their own blocks only, under their own causal mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from server.engine.blocks import ZERO_BLOCK
from server.engine.kv_cache import GroupedRead, PagedKVCache, ReadGroup
from server.engine.scheduler import ScheduledRow

# What reading one more group of rows apart costs (an index_select and an sdpa call per layer,
# for keys and values), in positions read per row. On the CPU here, 8 rows at 64 tokens beside
# one at 1,500 read 1,500 positions each as one group; as two they read 64 and 1,500.
GROUP_OVERHEAD_POSITIONS = 256


def group_by_length(blocks: Sequence[int], block_size: int) -> list[list[int]]:
    """Rows (indices into `blocks`) in groups that each read their longest row's blocks, with
    the fewest positions read plus GROUP_OVERHEAD_POSITIONS per group: rows sorted by length,
    cut where it pays (dynamic programming, O(rows^2))."""
    order = sorted(range(len(blocks)), key=blocks.__getitem__)
    best = [0.0] + [float("inf")] * len(order)
    cut = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        longest = blocks[order[end - 1]] * block_size
        for start in range(end):
            cost = best[start] + (end - start) * longest + GROUP_OVERHEAD_POSITIONS
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups = []
    end = len(order)
    while end:
        groups.append(order[cut[end] : end])
        end = cut[end]
    return groups[::-1]


@dataclass(frozen=True, slots=True)
class PackedBatch:
    input_ids: torch.Tensor  # [1, tokens]
    positions: torch.Tensor  # [1, tokens]
    last_tokens: torch.Tensor  # index of each sampling row's last fed token
    read: GroupedRead
    firsts: list[int]  # index of each row's first fed token (and the end, last)


def pack(
    rows: Sequence[ScheduledRow], cache: PagedKVCache, dtype: torch.dtype, kv_len_bucket: int
) -> PackedBatch:
    """Bind the cache's writes for the packed tokens and plan attention's groups."""
    device, block_size = cache.keys.device, cache.block_size
    starts = [row.request.next_position for row in rows]
    lengths = [row.num_tokens for row in rows]
    firsts = [0]
    for length in lengths:
        firsts.append(firsts[-1] + length)
    positions = [
        p for start, n in zip(starts, lengths, strict=True) for p in range(start, start + n)
    ]
    tokens = [
        t for row in rows for t in row.request.token_ids(row.request.num_cached, row.num_tokens)
    ]
    blocks = [-(-(s + n) // kv_len_bucket) * kv_len_bucket // block_size
              for s, n in zip(starts, lengths, strict=True)]  # fmt: skip
    width = max(blocks)
    tables = torch.tensor(
        [(row.request.block_table + [ZERO_BLOCK] * width)[:width] for row in rows], device=device
    )
    position_tensor = torch.tensor(positions, device=device)
    row_of_token = torch.repeat_interleave(  # output_size: no device-to-host read on GPUs
        torch.arange(len(rows), device=device),
        torch.tensor(lengths, device=device),
        output_size=len(positions),
    )
    slots = tables[row_of_token, position_tensor // block_size] * block_size
    cache.bind((slots + position_tensor % block_size)[None, :], tables)

    groups = _read_groups(lengths, blocks, firsts, position_tensor, tables, cache, dtype)
    sampling = [firsts[i + 1] - 1 for i, row in enumerate(rows) if row.samples]
    return PackedBatch(
        input_ids=torch.tensor([tokens], device=device),
        positions=position_tensor[None, :],
        last_tokens=torch.tensor(sampling, device=device, dtype=torch.long),
        read=GroupedRead(groups),
        firsts=firsts,
    )


def _read_groups(
    lengths: list[int],
    blocks: list[int],
    firsts: list[int],
    positions: torch.Tensor,
    tables: torch.Tensor,
    cache: PagedKVCache,
    dtype: torch.dtype,
) -> list[ReadGroup]:
    """Rows of one chunk length, cut by length (`group_by_length`); each group with its
    tokens' places in the packed sequence, its blocks and its causal mask."""
    device, block_size = positions.device, cache.block_size
    by_chunk: dict[int, list[int]] = {}
    for row, length in enumerate(lengths):
        by_chunk.setdefault(length, []).append(row)
    blocked = torch.finfo(dtype).min
    groups = []
    for q_len, members in by_chunk.items():
        for part in group_by_length([blocks[i] for i in members], block_size):
            rows = [members[i] for i in part]
            width = max(blocks[i] for i in rows)
            tokens = torch.tensor(
                [t for i in rows for t in range(firsts[i], firsts[i] + q_len)], device=device
            )
            query_positions = positions[tokens].view(len(rows), 1, q_len, 1)
            keys = torch.arange(width * block_size, device=device)
            mask = torch.zeros((len(rows), 1, q_len, keys.numel()), dtype=dtype, device=device)
            mask.masked_fill_(keys > query_positions, blocked)
            read_index = cache.read_index(tables[torch.tensor(rows, device=device), :width])
            groups.append(ReadGroup(tokens, q_len, read_index, mask))
    return groups
