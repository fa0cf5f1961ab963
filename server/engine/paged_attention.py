"""Attention that reads K/V in place from the paged pool: FlexAttention over the block tables.

The gather path (kv_cache.py) copies each row's blocks into a contiguous `[B, H, kv_len, D]`
tensor in every layer of every step for sdpa to read. Here a layer's keys and values are the
pool itself, `[1, H, blocks * block_size, D]` (one batch that every row broadcasts against),
and a `BlockMask` tells the kernel which pool blocks each row's queries read, in its table's
order: no copy.

What a query sees is the gather path's rule: query (b, j) sees the key at position p of its own
row iff p <= position(b, j), so a prefix (positions 0..T-1) is visible to every token of its row,
the row's own tokens causally, and nothing past the row's end. In the pool, slot s holds
position `i * block_size + s % block_size` of row b iff its block sits at index i of b's table.
The mask checks that ownership against b's own table, so a slot of another row's block, of a
free block or of the scratch block is never visible, whatever an earlier request left there:
the kernel masks with a select, never by adding -inf, so inf or NaN there cannot reach a score.

It relies on one invariant of the block tables: a block sits at the same index in every table
that holds it (a shared prefix block at its positions 0..T-1 in every row; every other block
belongs to one row). So one map from block to table index serves the whole batch.

The block sparsity is what the kernel reads: per row and tile of QUERY_TILE queries, the blocks
wholly at or below the tile's first position are full (read unmasked) and those up to its
highest position partial (masked); no other block of the pool is read. That matters beyond
speed: a masked key's weight is zero, and zero times a NaN or inf value left in a block the
row does not own would still be NaN. Every block a row owns is zeroed when handed out
(blocks.py), so the slots past its end that a partial block exposes hold zeros.

The compiled kernel runs on CUDA; elsewhere `listed_blocks_attention` computes the same thing
in plain torch ops (why not FlexAttention itself there: its docstring).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from server.engine.blocks import ZERO_BLOCK

# Queries per tile of the block mask: FlexAttention's own default, a multiple of the row tile
# of its kernels.
QUERY_TILE = 128


class PoolBlockMask(BlockMask):
    """A BlockMask that answers `ndim` as a 4D mask tensor does: transformers' GPT-2 reads it
    before handing a prepared mask on unchanged, and BlockMask has only `shape`."""

    ndim = 4


class PagedBlockMask:
    """Builds each forward's BlockMask from the rows' block tables and query positions."""

    def __init__(self, num_blocks: int, block_size: int, device: torch.device) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Which table index each pool block holds in this forward (only entries of blocks in
        # some table are meaningful; the mask checks them against the row's table). Allocated
        # once: written in place, it stays at one address, as a CUDA graph needs.
        self._table_index = torch.zeros(num_blocks, dtype=torch.long, device=device)

    def build(self, tables: torch.Tensor, positions: torch.Tensor) -> BlockMask:
        """`tables` `[B, width]` (padded with the zero block), `positions` `[B, q]` (each row's
        query positions, increasing, right-padded with 0). No host sync."""
        rows, width = tables.shape
        q_len = positions.shape[1]
        block_size = self.block_size
        columns = torch.arange(width, device=tables.device)
        table_index = self._table_index
        table_index.zero_()  # entries left from a wider table would index past this one
        table_index.scatter_(0, tables.reshape(-1), columns.repeat(rows))

        def visible(
            b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
        ) -> torch.Tensor:
            block = kv_idx // block_size
            index = table_index[block]
            owned = tables[b, index] == block
            return owned & (index * block_size + kv_idx % block_size <= positions[b, q_idx])

        tiles = -(-q_len // QUERY_TILE)
        padded = F.pad(positions, (0, tiles * QUERY_TILE - q_len)).view(rows, tiles, QUERY_TILE)
        # A tile's first query has its lowest position (0 where it is padding: then no block
        # counts as full, which costs masking, never correctness).
        num_full = (padded[:, :, 0] + 1) // block_size
        num_partial = padded.amax(dim=-1) // block_size + 1 - num_full
        full_indices = tables[:, None, :].expand(rows, tiles, width)
        after_full = (num_full[:, :, None] + columns).clamp(max=width - 1)
        partial_indices = tables.gather(1, after_full.view(rows, -1)).view(rows, tiles, width)
        return PoolBlockMask.from_kv_blocks(
            num_partial[:, None].int(),
            partial_indices[:, None].int(),
            num_full[:, None].int(),
            full_indices[:, None].int(),
            BLOCK_SIZE=(QUERY_TILE, block_size),
            mask_mod=visible,
            seq_lengths=(q_len, self.num_blocks * block_size),
            compute_q_blocks=False,  # only a backward pass reads them
        )


def paged_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    block_mask: BlockMask,
    scale: float | None,
) -> torch.Tensor:
    """`[B, q, Hq, D]` attention output of `query` `[B, Hq, q, D]` over the pool's `key` and
    `value` `[1, Hkv, slots, D]`: the compiled FlexAttention kernel on CUDA, its reference on
    other devices."""
    if not query.is_cuda:
        return listed_blocks_attention(query, key, value, block_mask, scale)
    output = _compiled_flex_attention()(
        query,
        key,
        value,
        block_mask=block_mask,
        scale=scale,
        enable_gqa=query.shape[1] != key.shape[1],
        # The kernel's key tile must divide the block mask's (one pool block); its default
        # tile is larger than a 16-token block.
        kernel_options={"BLOCK_N": block_mask.BLOCK_SIZE[1]},
    )
    assert isinstance(output, torch.Tensor)
    return output.transpose(1, 2).contiguous()


def listed_blocks_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    block_mask: BlockMask,
    scale: float | None,
) -> torch.Tensor:
    """What the compiled kernel computes, in plain torch ops, for CPUs and tests: each row's
    query tile reads the blocks its mask lists (full ones whole, partial ones under the mask)
    and no other slot of the pool. It gathers them, so it saves no copy; it is here because
    the alternatives on CPUs fail the engine's bar: FlexAttention's eager reference multiplies
    every slot of the pool by its zero weight (NaN or inf left in a free block turns every
    row's output into NaN), and its compiled CPU kernel (torch 2.13) takes ~9 s to compile
    per new batch shape and fails to compile with dynamic shapes."""
    rows, _, q_len, _ = query.shape
    block_size = block_mask.BLOCK_SIZE[1]
    assert block_mask.full_kv_num_blocks is not None and block_mask.full_kv_indices is not None
    width = block_mask.kv_indices.shape[-1]
    columns = torch.arange(width, device=query.device)
    offsets = torch.arange(block_size, device=query.device)
    row_index = torch.arange(rows, device=query.device)[:, None, None]
    outputs = []
    for tile in range(block_mask.kv_indices.shape[2]):
        num_full = block_mask.full_kv_num_blocks[:, 0, tile, None]
        num_partial = block_mask.kv_num_blocks[:, 0, tile, None]
        listed = torch.cat([columns < num_full, columns < num_partial], dim=1)
        full = torch.cat([columns < num_full, torch.zeros_like(listed[:, :width])], dim=1)
        indices = torch.cat(
            [block_mask.full_kv_indices[:, 0, tile], block_mask.kv_indices[:, 0, tile]], dim=1
        ).long()
        # Unlisted entries read the zero block, which holds zeros: never a NaN to multiply.
        blocks = torch.where(listed, indices, ZERO_BLOCK)
        slots = (blocks[:, :, None] * block_size + offsets).flatten(1)  # [B, keys]
        queries = torch.arange(
            tile * QUERY_TILE, min(q_len, (tile + 1) * QUERY_TILE), device=query.device
        )
        any_head = torch.zeros((), dtype=torch.long, device=query.device)  # it reads no head
        masked = block_mask.mask_mod(row_index, any_head, queries[None, :, None], slots[:, None])
        visible = listed.repeat_interleave(block_size, dim=1)[:, None] & (
            full.repeat_interleave(block_size, dim=1)[:, None] | masked
        )
        additive = torch.zeros(visible.shape, dtype=query.dtype, device=query.device)
        additive.masked_fill_(~visible, torch.finfo(query.dtype).min)
        outputs.append(
            F.scaled_dot_product_attention(
                query[:, :, queries],
                key[0][:, slots].transpose(0, 1),
                value[0][:, slots].transpose(0, 1),
                attn_mask=additive[:, None],
                scale=scale,
                enable_gqa=query.shape[1] != key.shape[1],
            )
        )
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous()


@functools.cache
def _compiled_flex_attention() -> Callable[..., Any]:
    return torch.compile(flex_attention)
