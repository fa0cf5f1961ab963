"""The attention the engine's forwards run: sdpa with grouped-query heads read in place.

transformers' own sdpa path expands every KV head to all the query heads it serves (`repeat_kv`)
whenever a mask is given, and the engine always gives one: at 1,500 tokens of context on the
CPU that copy cost 28 ms per layer for 8 rows where sdpa's `enable_gqa` takes 1.6 ms (measured
with torch 2.13; the outputs are bit-identical). The engine's mask is additive (0 / finfo.min):
with a boolean one, `enable_gqa` is twice as slow for prefill chunks.

It is registered in place of transformers' "sdpa" (AttentionInterface's way of overriding a
kernel), not under a name of its own: transformers builds masks by the kernel's name, and
PEFT's prefix tuning gave other tokens on a model switched to an unknown name (SmolLM2, "Write a
haiku about the sea."), while the server trains and compiles on the very model it serves.
Forwards that do not pass `engine_step=True` (training, compiling a soft prompt, PEFT) run
transformers' sdpa unchanged. An engine forward whose mask is a `BlockMask` reads the paged
pool in place (paged_attention.py): its key and value are the pool, not gathered rows.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from server.engine.kv_cache import GroupedRead
from server.engine.paged_attention import paged_attention

_transformers_sdpa = sdpa_attention_forward


def engine_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    step = kwargs.get("engine_step")
    if isinstance(step, GroupedRead):
        return grouped_sdpa(query, key, value, step, scaling), None
    if not step or attention_mask is None:
        return _transformers_sdpa(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if isinstance(attention_mask, BlockMask):
        return paged_attention(query, key, value, attention_mask, scaling), None
    output = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return output.transpose(1, 2).contiguous(), None


def grouped_sdpa(
    query: torch.Tensor,
    key_pool: torch.Tensor,
    value_pool: torch.Tensor,
    read: GroupedRead,
    scaling: float | None,
) -> torch.Tensor:
    """Attention of a packed forward (packed.py): `query` is `[1, H, tokens, D]`, the keys and
    values a layer's whole pool; each group's tokens against its own rows' blocks only.
    Returns `[1, tokens, H, D]`."""
    _, heads, num_tokens, head_dim = query.shape
    output = query.new_empty((num_tokens, heads, head_dim))
    for group in read.groups:
        rows, q_len = group.num_rows, group.q_len
        keys = read.gather(key_pool, group)
        values = read.gather(value_pool, group)
        queries = query[0].index_select(1, group.tokens).view(heads, rows, q_len, head_dim)
        out = F.scaled_dot_product_attention(
            queries.transpose(0, 1),
            keys,
            values,
            attn_mask=group.mask,
            scale=scaling,
            enable_gqa=heads != keys.shape[1],
        )  # [rows, H, q_len, D]
        output.index_copy_(0, group.tokens, out.transpose(1, 2).reshape(-1, heads, head_dim))
    return output[None]


AttentionInterface.register("sdpa", engine_sdpa)
