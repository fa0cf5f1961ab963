"""Attention read in place from the paged pool: the block mask shows each query exactly its own
row's positions up to its own, the blocks a compiled kernel reads cover them, and the output
equals sdpa over the gathered rows, whatever unrelated blocks hold."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_mask, flex_attention

from server.engine.paged_attention import QUERY_TILE, PagedBlockMask, paged_attention
from tests.tiny import DEVICE

BLOCK = 4
NUM_BLOCKS = 64
ZERO = 0  # the pool's zero block, which pads every table


def batch() -> tuple[torch.Tensor, torch.Tensor, list[list[int]], list[int]]:
    """Tables and query positions of a mixed forward: two rows share the prefix blocks 5 and 6
    (each with its own partial copy after them), one decodes, one prefills a chunk longer than
    a query tile (two tiles), one holds a single block. Returns tables `[B, width]`, positions
    `[B, q]` (right-padded with 0), each row's real table and its number of real queries."""
    real_tables = [
        [5, 6, 9, 12],  # decodes position 13
        [5, 6, 10, *range(20, 60)],  # prefills positions 20..169
        [7],  # prefills positions 0..2
        [5, 6, 11],  # decodes position 9
    ]
    starts_and_lengths = [(13, 1), (20, 150), (0, 3), (9, 1)]
    width = max(len(t) for t in real_tables)
    q_len = max(n for _, n in starts_and_lengths)
    tables = torch.tensor([t + [ZERO] * (width - len(t)) for t in real_tables])
    positions = torch.zeros(len(real_tables), q_len, dtype=torch.long)
    for row, (start, length) in enumerate(starts_and_lengths):
        positions[row, :length] = torch.arange(start, start + length)
    return tables, positions, real_tables, [n for _, n in starts_and_lengths]


def expected_visible(table: list[int], position: int) -> set[int]:
    """Pool slots of the row's positions 0..position."""
    return {table[p // BLOCK] * BLOCK + p % BLOCK for p in range(position + 1)}


def test_each_query_sees_its_own_rows_positions_up_to_its_own_and_nothing_else() -> None:
    tables, positions, real_tables, lengths = batch()
    mask = PagedBlockMask(NUM_BLOCKS, BLOCK, torch.device("cpu")).build(tables, positions)
    rows, q_len = positions.shape
    dense = create_mask(mask.mask_mod, rows, 1, q_len, NUM_BLOCKS * BLOCK, device="cpu")
    for row, table in enumerate(real_tables):
        for query in range(lengths[row]):
            seen = set(dense[row, 0, query].nonzero().flatten().tolist())
            assert seen == expected_visible(table, int(positions[row, query])), (row, query)


def test_the_blocks_a_kernel_reads_cover_every_visible_key_once() -> None:
    tables, positions, real_tables, lengths = batch()
    mask = PagedBlockMask(NUM_BLOCKS, BLOCK, torch.device("cpu")).build(tables, positions)
    assert mask.full_kv_num_blocks is not None and mask.full_kv_indices is not None
    for row, table in enumerate(real_tables):
        for tile in range(-(-lengths[row] // QUERY_TILE)):
            partial = mask.kv_indices[row, 0, tile, : mask.kv_num_blocks[row, 0, tile]].tolist()
            full = mask.full_kv_indices[row, 0, tile, : mask.full_kv_num_blocks[row, 0, tile]]
            full = full.tolist()
            assert len(set(partial) | set(full)) == len(partial) + len(full)  # each read once
            queries = range(tile * QUERY_TILE, min((tile + 1) * QUERY_TILE, lengths[row]))
            for query in queries:
                visible = expected_visible(table, int(positions[row, query]))
                assert {slot // BLOCK for slot in visible} <= set(partial) | set(full)
                # A full block is read without the mask: all of it must be visible.
                assert all(b * BLOCK + o in visible for b in full for o in range(BLOCK))
    decode_row = 0  # position 13: blocks 0..2 wholly visible, the fourth partly
    assert mask.full_kv_num_blocks[decode_row, 0, 0] == 3
    assert mask.kv_num_blocks[decode_row, 0, 0] == 1


@pytest.mark.parametrize("poison", [3e38, float("inf"), float("nan")], ids=["3e38", "inf", "nan"])
def test_output_equals_sdpa_over_gathered_rows_whatever_other_blocks_hold(poison: float) -> None:
    tables, positions, real_tables, lengths = batch()
    heads, kv_heads, dim = 4, 2, 8
    generator = torch.Generator().manual_seed(0)
    pool_k = torch.full((1, kv_heads, NUM_BLOCKS * BLOCK, dim), poison)
    pool_v = torch.full((1, kv_heads, NUM_BLOCKS * BLOCK, dim), poison)
    pool_k[:, :, :BLOCK] = pool_v[:, :, :BLOCK] = 0  # the zero block
    for block in {b for table in real_tables for b in table}:
        slots = slice(block * BLOCK, (block + 1) * BLOCK)
        pool_k[:, :, slots] = torch.randn(kv_heads, BLOCK, dim, generator=generator)
        pool_v[:, :, slots] = torch.randn(kv_heads, BLOCK, dim, generator=generator)
    query = torch.randn(len(real_tables), heads, positions.shape[1], dim, generator=generator)

    block_mask = PagedBlockMask(NUM_BLOCKS, BLOCK, torch.device("cpu")).build(tables, positions)
    paged = paged_attention(query, pool_k, pool_v, block_mask, scale=None)

    slots = (tables[:, :, None] * BLOCK + torch.arange(BLOCK)).flatten(1)  # [B, kv_len]
    gathered_k = pool_k[0][:, slots].transpose(0, 1)  # [B, kv_heads, kv_len, dim]
    gathered_v = pool_v[0][:, slots].transpose(0, 1)
    keys = torch.arange(slots.shape[1])
    visible = (keys[None, None, :] <= positions[:, :, None])[:, None]
    additive = torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)
    gathered = F.scaled_dot_product_attention(
        query, gathered_k, gathered_v, attn_mask=additive, enable_gqa=True
    ).transpose(1, 2)
    for row, length in enumerate(lengths):
        assert torch.isfinite(paged[row, :length]).all()
        torch.testing.assert_close(paged[row, :length], gathered[row, :length])


@pytest.mark.skipif(DEVICE != "cuda", reason="the compiled kernel runs on CUDA")
def test_the_compiled_kernel_on_cuda_equals_the_eager_reference() -> None:
    tables, positions, _, lengths = batch()
    heads, kv_heads, dim = 4, 2, 64
    generator = torch.Generator().manual_seed(0)
    pool_k = torch.randn(1, kv_heads, NUM_BLOCKS * BLOCK, dim, generator=generator)
    pool_v = torch.randn(1, kv_heads, NUM_BLOCKS * BLOCK, dim, generator=generator)
    query = torch.randn(len(lengths), heads, positions.shape[1], dim, generator=generator)
    reference = paged_attention(
        query,
        pool_k,
        pool_v,
        PagedBlockMask(NUM_BLOCKS, BLOCK, torch.device("cpu")).build(tables, positions),
        scale=None,
    )
    cuda = torch.device("cuda")
    mask = PagedBlockMask(NUM_BLOCKS, BLOCK, cuda).build(tables.to(cuda), positions.to(cuda))
    compiled = paged_attention(query.to(cuda), pool_k.to(cuda), pool_v.to(cuda), mask, None)
    for row, length in enumerate(lengths):
        torch.testing.assert_close(compiled[row, :length].cpu(), reference[row, :length])


def test_flexattention_itself_reads_the_mask_as_the_cpu_reference_does() -> None:
    tables, positions, _, lengths = batch()
    generator = torch.Generator().manual_seed(1)
    pool_k = torch.randn(1, 2, NUM_BLOCKS * BLOCK, 8, generator=generator)
    pool_v = torch.randn(1, 2, NUM_BLOCKS * BLOCK, 8, generator=generator)
    query = torch.randn(len(lengths), 4, positions.shape[1], 8, generator=generator)
    mask = PagedBlockMask(NUM_BLOCKS, BLOCK, torch.device("cpu")).build(tables, positions)
    reference = paged_attention(query, pool_k, pool_v, mask, scale=None)
    flex = flex_attention(query, pool_k, pool_v, block_mask=mask, enable_gqa=True)
    assert isinstance(flex, torch.Tensor)
    for row, length in enumerate(lengths):
        torch.testing.assert_close(flex.transpose(1, 2)[row, :length], reference[row, :length])


def test_a_compiled_flexattention_kernel_reading_only_the_listed_blocks_gives_the_same() -> None:
    """The eager FlexAttention above applies the mask to every slot and ignores the block lists;
    a compiled kernel reads only the listed blocks. Inductor's CPU kernel (one shape, compiled
    once) checks those lists; it needs them as wide as the pool."""
    tables, positions, _, lengths = batch()
    generator = torch.Generator().manual_seed(2)
    pool_k = torch.randn(1, 2, NUM_BLOCKS * BLOCK, 16, generator=generator)
    pool_v = torch.randn(1, 2, NUM_BLOCKS * BLOCK, 16, generator=generator)
    query = torch.randn(len(lengths), 4, positions.shape[1], 16, generator=generator)
    mask = PagedBlockMask(NUM_BLOCKS, BLOCK, torch.device("cpu")).build(tables, positions)
    assert mask.full_kv_num_blocks is not None and mask.full_kv_indices is not None
    pad = (0, NUM_BLOCKS - mask.kv_indices.shape[-1])
    pool_wide = type(mask).from_kv_blocks(  # the engine's own class: it must compile too
        mask.kv_num_blocks,
        F.pad(mask.kv_indices, pad),
        mask.full_kv_num_blocks,
        F.pad(mask.full_kv_indices, pad),
        BLOCK_SIZE=mask.BLOCK_SIZE,
        mask_mod=mask.mask_mod,
        seq_lengths=mask.seq_lengths,
        compute_q_blocks=False,
    )
    compiled = torch.compile(flex_attention, dynamic=False)
    output = compiled(query, pool_k, pool_v, block_mask=pool_wide, enable_gqa=True)
    assert isinstance(output, torch.Tensor)
    reference = paged_attention(query, pool_k, pool_v, mask, scale=None)
    for row, length in enumerate(lengths):
        torch.testing.assert_close(output.transpose(1, 2)[row, :length], reference[row, :length])
