"""The paged KV cache: a pool of fixed-size blocks, each row reading through its block table.

Position p of a row lives at offset p % block_size of block `table[p // block_size]`; a prefix
sits at positions 0..T-1, the row's own tokens from T on. The runner binds each forward's write
slots (one per fed token) and read tables (one per row) before calling the model; the model only
ever calls `update(key, value, layer_idx)` (transformers 5.23), which writes the new K/V in place
and returns the batch's rows of the cache, gathered block by block.

Nothing trusts a reused block to be clean: every block is zeroed before its first write, a row's
table is padded with the zero block (never written), and padding tokens write to the scratch
block, which no table holds. So a position past a row's end reads as zeros, masked by selection:
whatever an earlier request left (3e38, inf, NaN) never reaches another row's scores, where the
additive mask could not hide it (inf + -inf is NaN).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from prefixes import CompiledPrefix, ModelSpec
from server.engine.blocks import ZERO_BLOCK


class PagedKVCache(Cache):
    def __init__(
        self,
        spec: ModelSpec,
        num_blocks: int,
        block_size: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(layers=[])
        self.block_size = block_size
        # [layer, block, offset, head, dim]: a block is one contiguous run of block_size tokens,
        # so a read gathers whole blocks and a write is one index_copy_ per layer. Left empty:
        # a block's pages are touched only when it is first handed out (and zeroed).
        shape = (spec.num_layers, num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.zero([ZERO_BLOCK])
        self._write_slots = torch.zeros(0, dtype=torch.long, device=device)
        self._read_blocks = torch.zeros(0, dtype=torch.long, device=device)
        self._read_rows = 0

    def zero(self, blocks: list[int]) -> None:
        if blocks:
            index = torch.tensor(blocks, device=self.keys.device)
            self.keys.index_fill_(1, index, 0)
            self.values.index_fill_(1, index, 0)

    def load_prefix(self, blocks: list[int], prefix: CompiledPrefix) -> None:
        """Write a compiled prefix `[L, 2, H, T, D]` into positions 0..T-1 of these blocks."""
        tokens = prefix.num_virtual_tokens
        layers, _, _, heads, head_dim = self.keys.shape
        expected = (layers, 2, heads, tokens, head_dim)
        if tuple(prefix.kv.shape) != expected or len(blocks) * self.block_size < tokens:
            # Copying a wrong shape could broadcast silently into garbage: refuse it.
            raise ValueError(
                f"prefix KV: expected shape {expected}, found {tuple(prefix.kv.shape)}"
            )
        slots = self.slots(blocks, torch.arange(tokens, device=self.keys.device))
        flat = (layers, -1, heads, head_dim)
        # [L, H, T, D] -> [L, T, H, D], written at the prefix's flat slots in every layer.
        self.keys.view(flat)[:, slots] = prefix.kv[:, 0].transpose(1, 2).to(self.keys.dtype)
        self.values.view(flat)[:, slots] = prefix.kv[:, 1].transpose(1, 2).to(self.keys.dtype)

    def copy_block(self, source: int, target: int) -> None:
        self.keys[:, target] = self.keys[:, source]
        self.values[:, target] = self.values[:, source]

    def slots(self, blocks: list[int], positions: torch.Tensor) -> torch.Tensor:
        """Flat slot (block * block_size + offset) of each position of one row."""
        table = torch.tensor(blocks, device=positions.device)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size

    def bind(self, write_slots: torch.Tensor, read_blocks: torch.Tensor) -> None:
        """Where the next forward writes (a flat slot per fed token, padding to the scratch
        block) and what each row reads: its table `[B, blocks]`, padded with the zero block."""
        self._write_slots = write_slots.reshape(-1)
        self._read_blocks = read_blocks.reshape(-1)
        self._read_rows = read_blocks.shape[0]

    @property
    def kv_len(self) -> int:
        return self._read_blocks.numel() // max(self._read_rows, 1) * self.block_size

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        num_blocks, block_size, heads, head_dim = keys.shape
        # Both copies go through 2D views: index_copy_ / index_select over rows of a 2D tensor
        # are one memcpy per row, where the same call on the 4D tensor took ~8x longer on CPUs.
        # key_states: [B, H, q, D] -> [B*q, H*D], one row per written position.
        per_token = (num_blocks * block_size, heads * head_dim)
        keys.view(per_token).index_copy_(
            0, self._write_slots, key_states.transpose(1, 2).reshape(-1, heads * head_dim)
        )
        values.view(per_token).index_copy_(
            0, self._write_slots, value_states.transpose(1, 2).reshape(-1, heads * head_dim)
        )
        per_block = (num_blocks, block_size * heads * head_dim)
        read_shape = (self._read_rows, self.kv_len, heads, head_dim)
        read_k = keys.view(per_block).index_select(0, self._read_blocks).view(read_shape)
        read_v = values.view(per_block).index_select(0, self._read_blocks).view(read_shape)
        return read_k.transpose(1, 2), read_v.transpose(1, 2)  # [B, H, kv_len, D]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.kv_len

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.keys.shape[1] * self.block_size

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()
