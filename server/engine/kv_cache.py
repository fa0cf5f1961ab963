"""The paged KV cache: a pool of fixed-size blocks, each row reading through its block table.

Position p of a row lives at offset p % block_size of block `table[p // block_size]`; a prefix
sits at positions 0..T-1, the row's own tokens from T on. The runner binds each forward's write
slots (one per fed token) and read tables (one per row) before calling the model; the model only
ever calls `update(key, value, layer_idx)` (transformers 5.23), which writes the new K/V in place
and returns the batch's rows of the cache, gathered block by block; or, when attention reads the
pool in place (`read_in_place`, paged_attention.py), the layer's whole pool, with no copy.

Nothing trusts a reused block to be clean: every block is zeroed before its first write, a row's
table is padded with the zero block (never written), and padding tokens write to the scratch
block, which no table holds. So a position past a row's end reads as zeros, masked by selection:
whatever an earlier request left (3e38, inf, NaN) never reaches another row's scores, where the
additive mask could not hide it (inf + -inf is NaN).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from prefixes import CompiledPrefix, ModelSpec
from server.engine.blocks import ZERO_BLOCK


@dataclass(frozen=True, slots=True)
class ReadGroup:
    """Rows of a packed forward (packed.py) that attention reads together: the same number of
    fed tokens each, the same number of blocks read."""

    tokens: torch.Tensor  # their tokens' indices in the packed sequence, row by row
    q_len: int  # tokens fed per row
    read_index: torch.Tensor  # their blocks in a layer's [heads * blocks, block] view
    mask: torch.Tensor  # [rows, 1, q_len, kv_len], additive

    @property
    def num_rows(self) -> int:
        return self.mask.shape[0]

    @property
    def kv_len(self) -> int:
        return self.mask.shape[-1]


@dataclass(frozen=True, slots=True)
class GroupedRead:
    """How attention reads a packed forward, group by group (`engine_step` of the engine's
    sdpa, attention.py): a row of 64 tokens beside one of 1,500 reads 64, not 1,500."""

    groups: list[ReadGroup]

    @staticmethod
    def gather(pool: torch.Tensor, group: ReadGroup) -> torch.Tensor:
        """The group's rows of a layer's pool `[H, blocks, block, D]`: `[rows, H, kv_len, D]`."""
        heads, num_blocks, block_size, head_dim = pool.shape
        per_block = pool.view(heads * num_blocks, block_size * head_dim)
        read = per_block.index_select(0, group.read_index)
        return read.view(heads, group.num_rows, group.kv_len, head_dim).transpose(0, 1)


class PagedKVCache(Cache):
    def __init__(
        self,
        spec: ModelSpec,
        num_blocks: int,
        block_size: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        read_in_place: bool = False,
    ) -> None:
        super().__init__(layers=[])
        self.read_in_place = read_in_place
        self.block_size = block_size
        self.num_blocks = num_blocks
        # [layer, head, block, offset, dim]: within a head a block is one contiguous run of
        # block_size tokens, so a read gathers whole blocks and hands attention each (row, head)
        # as contiguous [tokens, dim], the layout its kernels read fastest (token-major blocks,
        # [.., offset, head, dim], made every head's keys strided: 19% slower steps at 1,500
        # tokens on CPUs, measured with bench/long_context.py). Left empty: a block's pages are
        # touched only when it is first handed out (and zeroed).
        shape = (spec.num_layers, spec.num_kv_heads, num_blocks, block_size, spec.head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.zero([ZERO_BLOCK])
        self._heads = torch.arange(spec.num_kv_heads, device=device)[:, None]
        self._write_index = torch.zeros(0, dtype=torch.long, device=device)
        self._read_index = torch.zeros(0, dtype=torch.long, device=device)
        self._read_rows = 0
        self._read_blocks = 0
        self.grouped: GroupedRead | None = None

    def zero(self, blocks: list[int]) -> None:
        if blocks:
            index = torch.tensor(blocks, device=self.keys.device)
            self.keys.index_fill_(2, index, 0)
            self.values.index_fill_(2, index, 0)

    def load_prefix(self, blocks: list[int], prefix: CompiledPrefix) -> None:
        """Write a compiled prefix `[L, 2, H, T, D]` into positions 0..T-1 of these blocks."""
        tokens = prefix.num_virtual_tokens
        layers, heads, _, _, head_dim = self.keys.shape
        expected = (layers, 2, heads, tokens, head_dim)
        if tuple(prefix.kv.shape) != expected or len(blocks) * self.block_size < tokens:
            # Copying a wrong shape could broadcast silently into garbage: refuse it.
            raise ValueError(
                f"prefix KV: expected shape {expected}, found {tuple(prefix.kv.shape)}"
            )
        slots = self.slots(blocks, torch.arange(tokens, device=self.keys.device))
        per_token = (layers, heads, -1, head_dim)
        self.keys.view(per_token)[:, :, slots] = prefix.kv[:, 0].to(self.keys.dtype)
        self.values.view(per_token)[:, :, slots] = prefix.kv[:, 1].to(self.keys.dtype)

    def copy_block(self, source: int, target: int) -> None:
        self.keys[:, :, target] = self.keys[:, :, source]
        self.values[:, :, target] = self.values[:, :, source]

    def slots(self, blocks: list[int], positions: torch.Tensor) -> torch.Tensor:
        """Flat slot (block * block_size + offset) of each position of one row."""
        table = torch.tensor(blocks, device=positions.device)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size

    def bind(self, write_slots: torch.Tensor, read_blocks: torch.Tensor) -> None:
        """Where the next forward writes (a flat slot per fed token, padding to the scratch
        block) and what each row reads: its table `[B, blocks]`, padded with the zero block.
        Indices are made per head here, once per forward, not once per layer."""
        tokens_per_head = self.num_blocks * self.block_size
        self._write_index = (self._heads * tokens_per_head + write_slots.reshape(1, -1)).reshape(-1)
        self.grouped = None
        if not self.read_in_place:
            heads = self._heads * self.num_blocks
            self._read_index = (heads + read_blocks.reshape(1, -1)).reshape(-1)
        self._read_rows, self._read_blocks = read_blocks.shape

    def read_index(self, tables: torch.Tensor) -> torch.Tensor:
        """Blocks `[rows, blocks]` as rows of a layer's `[heads * blocks, block]` view, head by
        head: what GroupedRead.gather selects."""
        return (self._heads * self.num_blocks + tables.reshape(1, -1)).reshape(-1)

    def read_grouped(self, read: GroupedRead) -> None:
        """After `bind`: the next forward is packed, and `update` returns each layer's whole
        pool for attention to gather group by group."""
        self.grouped = read

    @property
    def kv_len(self) -> int:
        return self._read_blocks * self.block_size

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        heads, num_blocks, block_size, head_dim = keys.shape
        # key_states: [B, H, q, D] -> [H*B*q, D], in the order of the write index. Both copies go
        # through 2D views: one memcpy per row (the same calls on 4D tensors were several times
        # slower on CPUs).
        keys.view(-1, head_dim).index_copy_(
            0, self._write_index, key_states.transpose(0, 1).reshape(-1, head_dim)
        )
        values.view(-1, head_dim).index_copy_(
            0, self._write_index, value_states.transpose(0, 1).reshape(-1, head_dim)
        )
        if self.grouped is not None:
            return keys, values  # attention gathers each group's blocks (GroupedRead)
        if self.read_in_place:
            pool = (1, heads, num_blocks * block_size, head_dim)
            return keys.view(pool), values.view(pool)
        per_block = (heads * num_blocks, block_size * head_dim)
        read_shape = (heads, self._read_rows, self.kv_len, head_dim)
        read_k = keys.view(per_block).index_select(0, self._read_index).view(read_shape)
        read_v = values.view(per_block).index_select(0, self._read_index).view(read_shape)
        return read_k.transpose(0, 1), read_v.transpose(0, 1)  # [B, H, kv_len, D]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.kv_len

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.num_blocks * self.block_size
