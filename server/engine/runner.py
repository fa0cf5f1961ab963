"""Run one forward for a batch whose rows carry different prefixes and are in different phases.

Each row feeds its pending tokens (a prompt in prefill, one token in decode) at positions
prefix_len + num_cached onwards. Rows are right-padded to the longest; a padding token gets
position 0 and writes its K/V into the cache's scratch slot, so it never disturbs a real row.
The model gets explicit per-row position ids and a 4D mask in which query (b, j) sees key k of
its own slot iff k <= position(b, j): the prefix at 0..T-1 and the row's earlier tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from prefixes import CompiledPrefix, ModelSpec
from server.engine.kv_cache import SlotKVCache
from server.engine.request import Request
from server.engine.sampler import sample
from server.models import attention_kernels

# On GPUs keys are read in lengths rounded up to this: attention kernels that plan per shape
# (cuDNN's sdpa in bf16 spent ~1.4 ms of CPU on each new shape on an H100) then see a few
# shapes instead of one per token. On CPUs the padding costs more than it saves.
GPU_KV_LEN_BUCKET = 64

# A forward's fixed cost (Python, kernel launches, weight reads), in padded-token equivalents.
FORWARD_OVERHEAD_TOKENS = 64


def plan_forwards(
    requests: Sequence[Request], overhead_tokens: int = FORWARD_OVERHEAD_TOKENS
) -> list[list[Request]]:
    """One padded forward for all rows, or decode rows and prefill rows apart when padding
    every decode row to the longest prompt would cost more than a second forward."""
    decode = [r for r in requests if len(r.pending_token_ids) == 1]
    prefill = [r for r in requests if len(r.pending_token_ids) > 1]
    if not decode or not prefill:
        return [list(requests)]
    longest = max(len(r.pending_token_ids) for r in prefill)
    joint = len(requests) * longest
    split = len(decode) + len(prefill) * longest + overhead_tokens
    return [decode, prefill] if split < joint else [list(requests)]


class ModelRunner:
    def __init__(self, model: PreTrainedModel, spec: ModelSpec, num_slots: int, max_len: int):
        self.model = model
        self.spec = spec
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        if spec.absolute_positions and max_len > spec.max_positions:
            raise ValueError(
                f"max_len: expected <= the model's {spec.max_positions} positions, found {max_len}"
            )
        self.max_len = max_len
        self.forward_overhead_tokens = FORWARD_OVERHEAD_TOKENS
        self.kv_len_bucket = GPU_KV_LEN_BUCKET if self.device.type == "cuda" else 1
        self.cache = SlotKVCache(spec, num_slots, max_len, dtype=self.dtype, device=self.device)
        # eager attention adds the mask to the scores: it needs 0 / -inf-like floats, and a bool
        # mask would be added as 1/0 without any error. sdpa takes a bool mask (True = attend).
        self.additive_mask = model.config._attn_implementation != "sdpa"
        self.decoder = model.base_model
        self.lm_head = model.get_output_embeddings()
        self.softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)

    def load_prefix(self, slot: int, prefix: CompiledPrefix | None) -> None:
        if prefix is not None:
            self.cache.load_prefix(slot, prefix)

    @torch.inference_mode()
    def step(self, requests: Sequence[Request]) -> list[int | None]:
        """Feed every request its pending tokens; return each one's next token id, or None for a
        row whose logits are not finite (its own values overflowed: it must fail, alone)."""
        groups = plan_forwards(requests, self.forward_overhead_tokens)
        with attention_kernels(self.device, self.dtype):
            logits = torch.cat([self.forward(group) for group in groups])
        ordered = [request for group in groups for request in group]
        finite = torch.isfinite(logits).all(dim=-1)
        # One device-to-host read for both: a non-finite row's id becomes -1.
        next_ids = torch.where(finite, sample(logits, ordered), -1).tolist()
        # Only now, when nothing can raise any more: a step that raised advanced no row, so the
        # engine can run its rows again, alone, to find the one that fails.
        for request in ordered:
            request.num_cached += len(request.pending_token_ids)
        by_request = {
            id(r): (t if t >= 0 else None) for r, t in zip(ordered, next_ids, strict=True)
        }
        return [by_request[id(request)] for request in requests]

    @torch.inference_mode()
    def forward(self, requests: Sequence[Request]) -> torch.Tensor:
        """Logits `[B, vocab]` (float32) at each request's last pending token."""
        device = self.device
        pending = [r.pending_token_ids for r in requests]
        lengths = torch.tensor([len(p) for p in pending], device=device)
        starts = torch.tensor([r.next_position for r in requests], device=device)
        slots = torch.tensor([r.slot for r in requests], device=device)
        q_len = max(len(p) for p in pending)
        kv_len = max(r.next_position + len(p) for r, p in zip(requests, pending, strict=True))
        if kv_len > self.max_len:
            raise ValueError(f"positions: expected < {self.max_len}, found {kv_len - 1}")
        bucket = self.kv_len_bucket
        kv_len = min(self.max_len, -(-kv_len // bucket) * bucket)  # the tail is masked out

        offsets = torch.arange(q_len, device=device)[None, :]
        real = offsets < lengths[:, None]
        positions = torch.where(real, starts[:, None] + offsets, 0)
        input_ids = torch.zeros(real.shape, dtype=torch.long, device=device)
        input_ids[real] = torch.tensor([t for p in pending for t in p], device=device)
        write_slots = torch.where(real, slots[:, None], self.cache.scratch_slot)
        write_pos = torch.where(real, positions, offsets)
        self.cache.bind(slots, starts + lengths, write_slots, write_pos, kv_len)

        hidden = self.decoder(
            input_ids=input_ids,
            position_ids=positions,
            attention_mask=self._mask(positions, kv_len),
            past_key_values=self.cache,
            use_cache=True,
        ).last_hidden_state
        last = hidden[torch.arange(len(requests), device=device), lengths - 1]
        logits = self.lm_head(last).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _mask(self, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        keys = torch.arange(kv_len, device=self.device)
        visible = (keys[None, None, :] <= positions[:, :, None])[:, None]  # [B, 1, q, kv]
        if not self.additive_mask:
            return visible
        blocked = torch.finfo(self.dtype).min
        return torch.zeros(visible.shape, dtype=self.dtype, device=self.device).masked_fill(
            ~visible, blocked
        )
