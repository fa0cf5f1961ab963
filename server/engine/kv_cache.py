"""The slot KV cache: one slot per running request, storage index == position id.

A slot holds the request's prefix K/V at 0..T-1 and its own tokens from T on. The runner binds
each forward's write and read indices before calling the model; the model only ever calls
`update(key, value, layer_idx)` (transformers 5.23), which writes the new K/V in place and
returns the batch's rows of the cache.

Nothing trusts a freed slot to be clean. Rows are read up to the batch's longest, so a shorter
row's read reaches past its own end into whatever an earlier request left in that slot. The
attention mask hides those positions, but hiding is addition: a stale key of 3e38 makes a
score of inf, and inf + -inf is NaN, which turns the whole row into NaN. So every position past
a row's own end is read from the zero slot instead, a slot no request ever owns and nothing ever
writes: masked by selection, such a position contributes exactly nothing whatever its own slot
holds, and the read stays one gather per layer.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from prefixes import CompiledPrefix, ModelSpec


class SlotKVCache(Cache):
    def __init__(
        self,
        spec: ModelSpec,
        num_slots: int,
        max_len: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(layers=[])
        self.num_slots = num_slots
        self.max_len = max_len
        # One extra slot absorbs the writes of padding tokens, so they never touch a real row;
        # another stays zeros for ever: what positions past a row's end read.
        self.scratch_slot = num_slots
        self.zero_slot = num_slots + 1
        # Layout [layer, slot, position, head, dim]: (slot, position) flatten to one index, so a
        # step's writes are one index_copy_ per layer and its reads one index_select.
        shape = (spec.num_layers, num_slots + 2, max_len, spec.num_kv_heads, spec.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self._write_index = torch.zeros(0, dtype=torch.long, device=device)
        self._read_index = torch.zeros(0, dtype=torch.long, device=device)
        self._read_rows = 0
        self._kv_len = 0

    def load_prefix(self, slot: int, prefix: CompiledPrefix) -> None:
        """Copy a compiled prefix `[L, 2, H, T, D]` into positions 0..T-1 of a slot."""
        tokens = prefix.num_virtual_tokens
        layers, _, _, heads, head_dim = self.keys.shape
        expected = (layers, 2, heads, tokens, head_dim)
        if tuple(prefix.kv.shape) != expected or tokens >= self.max_len:
            # Copying a wrong shape could broadcast silently into garbage: refuse it.
            raise ValueError(
                f"prefix KV: expected shape {expected}, found {tuple(prefix.kv.shape)}"
            )
        self.keys[:, slot, :tokens] = prefix.kv[:, 0].transpose(1, 2)
        self.values[:, slot, :tokens] = prefix.kv[:, 1].transpose(1, 2)

    def bind(
        self,
        read_slots: torch.Tensor,
        read_ends: torch.Tensor,
        write_slots: torch.Tensor,
        write_pos: torch.Tensor,
        kv_len: int,
    ) -> None:
        """Set where the next forward writes (per token) and what it reads (per row): positions
        0..kv_len-1 of each row's slot, of which those from the row's end on read as zeros."""
        self._write_index = (write_slots * self.max_len + write_pos).reshape(-1)
        positions = torch.arange(kv_len, device=read_ends.device)[None, :]
        own = read_slots[:, None] * self.max_len + positions
        zero = self.zero_slot * self.max_len
        self._read_index = torch.where(positions < read_ends[:, None], own, zero).reshape(-1)
        self._read_rows = len(read_slots)
        self._kv_len = kv_len

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        flat_shape = (-1, *keys.shape[2:])
        # key_states: [B, H, q, D] -> [B*q, H, D], one row per written position.
        new_k = key_states.transpose(1, 2).reshape(flat_shape)
        new_v = value_states.transpose(1, 2).reshape(flat_shape)
        keys.view(flat_shape).index_copy_(0, self._write_index, new_k)
        values.view(flat_shape).index_copy_(0, self._write_index, new_v)
        read_shape = (self._read_rows, self._kv_len, *keys.shape[2:])
        read_k = keys.view(flat_shape).index_select(0, self._read_index).view(read_shape)
        read_v = values.view(flat_shape).index_select(0, self._read_index).view(read_shape)
        return read_k.transpose(1, 2), read_v.transpose(1, 2)  # [B, H, kv_len, D]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_len

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()
