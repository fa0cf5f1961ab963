"""Run one forward for rows that carry different prefixes and are in different phases.

Each scheduled row feeds `num_tokens` of its own tokens (a prompt chunk in prefill, one token in
decode) at positions prefix_len + num_cached onwards. Logits are computed only for rows whose
pending tokens are all fed this step.

With sdpa (every model loaded the default way) a step's rows are packed into one sequence of
exactly the fed tokens, each at its own position (packed.py), and the engine's sdpa runs
attention group by group, each group reading only its rows' blocks under their own mask. With
eager attention or the paged kernel rows are right-padded to the longest: a padding token gets
position 0 and writes its K/V into the scratch block, so it never disturbs a real row, and the
model gets a 4D mask in which query (b, j) sees key k of its own row iff k <= position(b, j);
attention reads the rows' K/V gathered into contiguous rows (eager) or in place from the pool
under a FlexAttention block mask built from the same tables and positions (`"paged"`,
paged_attention.py).

A forward whose rows all decode one token can run on static shapes instead (static_decode.py:
batch and block-table buckets, inputs in preallocated buffers, on CUDA replayed from a CUDA
graph); it computes the same thing, and the tests hold the paths token-equal.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future

import numpy as np
import torch
from torch.nn.attention.flex_attention import BlockMask
from transformers import PreTrainedModel

from prefixes import ModelSpec
from server.engine import attention  # noqa: F401  (registers the engine's sdpa)
from server.engine.blocks import SCRATCH_BLOCK, ZERO_BLOCK
from server.engine.cuda_graphs import CudaGraphs
from server.engine.ensemble import mean_of_groups
from server.engine.grammar import MaskFiller, apply_masks
from server.engine.kv_cache import GroupedRead, PagedKVCache
from server.engine.logits_processing import process_logits
from server.engine.logprobs import ChosenLogprobs, chosen_tensor, score_tokens, unpack_chosen
from server.engine.packed import pack
from server.engine.paged_attention import PagedBlockMask
from server.engine.request import Request
from server.engine.sampler import sample
from server.engine.scheduler import ScheduledRow
from server.engine.static_decode import DecodeBuffers, StaticDecoder
from server.engine.step_cost import FORWARD_OVERHEAD_TOKENS, plan_forwards
from server.models import attention_kernels

# On GPUs keys are read in lengths rounded up to this: attention kernels that plan per shape
# (cuDNN's sdpa in bf16 spent ~1.4 ms of CPU on each new shape on an H100) then see a few
# shapes instead of one per token. On CPUs the padding costs more than it saves.
GPU_KV_LEN_BUCKET = 64


class ModelRunner:
    def __init__(
        self,
        model: PreTrainedModel,
        spec: ModelSpec,
        num_blocks: int,
        block_size: int,
        *,
        max_rows: int = 1,
        max_len: int | None = None,
        static_decode: bool = False,
        cuda_graphs: bool = False,
        paged_attention: bool = False,
        eos_token_ids: frozenset[int] = frozenset(),
    ) -> None:
        """`max_rows` and `max_len` bound the static decode path's buckets (rows per step,
        positions per row); `cuda_graphs` replays that path from CUDA graphs;
        `paged_attention` reads K/V in place through the block tables instead of gathering."""
        self.model = model
        self.spec = spec
        self.eos_token_ids = eos_token_ids  # masked for rows short of their min_tokens
        self.masks = MaskFiller(spec.vocab_size)  # constrained rows' tokens (grammar.py)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.block_size = block_size
        self.forward_overhead_tokens = FORWARD_OVERHEAD_TOKENS
        self.kv_len_bucket = GPU_KV_LEN_BUCKET if self.device.type == "cuda" else block_size
        if paged_attention and model.config._attn_implementation != "sdpa":
            # Only the engine's sdpa (attention.py) knows a block mask.
            raise ValueError(
                "paged attention: expected a model loaded with sdpa attention, found "
                f"{model.config._attn_implementation}"
            )
        self.paged_mask = (
            PagedBlockMask(num_blocks, block_size, self.device) if paged_attention else None
        )
        # Forwards are packed (packed.py) where the engine's sdpa runs attention; eager
        # attention and the paged kernel take rows padded to the longest.
        self.packs = not paged_attention and model.config._attn_implementation == "sdpa"
        self._no_mask = torch.zeros((1, 1, 1, 1), dtype=self.dtype, device=self.device)
        self.cache = PagedKVCache(
            spec,
            num_blocks,
            block_size,
            dtype=self.dtype,
            device=self.device,
            read_in_place=paged_attention,
        )
        # The mask is additive (0 / finfo.min) for every kernel: eager adds it to the scores (a
        # bool mask would be added as 1/0 without any error), and the engine's sdpa is faster
        # with it (attention.py, imported for its registration).
        self.decoder = model.base_model
        self.lm_head = model.get_output_embeddings()
        self.softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
        self.static: StaticDecoder | None = None
        if static_decode:
            self.static = StaticDecoder(
                self.decode_forward,
                device=self.device,
                block_size=block_size,
                max_rows=max_rows,
                max_blocks=-(-(max_len or spec.max_positions) // block_size),
                vocab_size=spec.vocab_size,
                min_blocks=max(1, self.kv_len_bucket // block_size),
                graphs=CudaGraphs(self.device) if cuda_graphs else None,
            )

    @torch.inference_mode()
    def step(self, rows: Sequence[ScheduledRow]) -> list[int | None]:
        """Feed every row its tokens; return the next token id of each row that samples (in
        order), or None for one whose logits are not finite (its own values overflowed).

        A row fed nothing that takes its logits from another row (`logits_of`: one of `n`
        choices that share a prompt) samples its own token from that row's distribution."""
        sampling = [row.request for row in rows if row.samples]
        masks = self.masks.start(sampling)  # filled on a host thread while the forward runs
        fed = [row for row in rows if row.num_tokens > 0]
        groups = [fed] if self.packs else plan_forwards(fed, self.forward_overhead_tokens)
        with attention_kernels(self.device, self.dtype):
            logits = [self._run(group) for group in groups if group]
        ordered = [row.request for group in groups for row in group if row.samples]
        next_ids: list[int] = []
        chosen: list[ChosenLogprobs | None] = []
        if ordered:
            all_logits = torch.cat(logits)
            sharing = [row for row in rows if row.logits_of is not None]
            if sharing:
                index_of = {id(request): i for i, request in enumerate(ordered)}
                shared = torch.tensor([index_of[id(row.logits_of)] for row in sharing])
                all_logits = torch.cat([all_logits, all_logits[shared.to(self.device)]])
                ordered += [row.request for row in sharing]
            next_ids, chosen = self._choose(all_logits, ordered, masks)
        # Only now, when nothing can raise any more: a step that raised advanced no row, so the
        # engine can run its rows again, alone, to find the one that fails.
        for row in rows:
            row.request.num_cached += row.num_tokens
        for request, token, logprobs in zip(ordered, next_ids, chosen, strict=True):
            if logprobs is not None and token >= 0:
                request.output_logprobs.append(logprobs[0])
                if request.sampling.logprobs is not None:
                    request.output_top_logprobs.append(logprobs[1])
        by_request = {
            id(r): (t if t >= 0 else None) for r, t in zip(ordered, next_ids, strict=True)
        }
        return [by_request[id(request)] for request in sampling]

    def _choose(
        self,
        logits: torch.Tensor,
        requests: list[Request],
        masks: Future[dict[int, np.ndarray]] | None = None,
    ) -> tuple[list[int], list[ChosenLogprobs | None]]:
        """Each row's next token id (-1 where its logits are not finite: its own values
        overflowed) and, for each row that records them, the chosen token's log-probability
        and its most likely alternatives (None for the others), in one device-to-host read.
        Constrained rows choose among the tokens their grammar allows (`masks`)."""
        combined, source = mean_of_groups(logits, requests)
        finite = torch.isfinite(combined).all(dim=-1)
        processed = process_logits(combined, requests, self.eos_token_ids)
        if masks is not None:
            processed = apply_masks(processed, requests, masks.result())
        next_ids = torch.where(finite, sample(processed, requests), -1)
        if source is not None:  # a lockstep group's rows take their leader's token
            next_ids = next_ids[source]
        # A lockstep group's other rows take their leader's token; only its record counts.
        wanting = [
            i
            for i, r in enumerate(requests)
            if r.records_logprobs and (r.lockstep_group is None or r is r.lockstep_group.leader)
        ]
        if not wanting:
            return next_ids.tolist(), [None] * len(requests)
        rows = torch.tensor(wanting, device=logits.device)
        top = [requests[i].sampling.logprobs or 0 for i in wanting]
        log_probs = combined[rows].log_softmax(dim=-1)
        read = chosen_tensor(log_probs, next_ids[rows], max(top))
        # float64 holds every token id exactly: the ids and the log-probs in one read.
        host = torch.cat([next_ids.double(), read]).tolist()
        found = unpack_chosen(host[len(requests) :], top)
        chosen: list[ChosenLogprobs | None] = [None] * len(requests)
        for i, logprobs in zip(wanting, found, strict=True):
            chosen[i] = logprobs
        return [int(t) for t in host[: len(requests)]], chosen

    def _score_prompts(
        self, rows: Sequence[ScheduledRow], hidden_of: Callable[[int, int, int], torch.Tensor]
    ) -> None:
        """Record the log-probs of the prompt tokens that this step's fed tokens predict, for
        the rows that ask (`hidden_of(row, start, end)`: the hidden states of the row's fed
        tokens start..end-1, counted from its first fed one). Positions already scored (a row
        recomputed after a preemption, or a step retried) are not scored again."""
        for i, row in enumerate(rows):
            request = row.request
            if not request.wants_prompt_logprobs:
                continue
            first = request.num_cached  # own index of the row's first fed token
            # Own token j predicts prompt token j + 1, recorded at prompt_logprobs[j].
            begin = max(first, len(request.prompt_logprobs))
            end = min(first + row.num_tokens, len(request.prompt_token_ids) - 1)
            if begin >= end:
                continue
            targets = request.prompt_token_ids[begin + 1 : end + 1]
            top = request.sampling.prompt_logprobs or 0
            hidden = hidden_of(i, begin - first, end - first)
            request.prompt_logprobs += score_tokens(hidden, targets, top, self._logits)

    def _run(self, rows: Sequence[ScheduledRow]) -> torch.Tensor:
        key = None if self.static is None else self.static.key(rows)
        if key is None:
            return self.forward(rows)
        assert self.static is not None
        return self.static.run(rows, key)

    @torch.inference_mode()
    def forward(self, rows: Sequence[ScheduledRow]) -> torch.Tensor:
        """Logits `[S, vocab]` (float32) at the last fed token of each row that samples."""
        if self.packs:
            return self._packed_forward(rows)
        return self._padded_forward(rows)

    def _packed_forward(self, rows: Sequence[ScheduledRow]) -> torch.Tensor:
        """Every fed token once, in one sequence (packed.py)."""
        batch = pack(rows, self.cache, self.dtype, self.kv_len_bucket)
        self.cache.read_grouped(batch.read)
        # A 4D mask is what makes transformers pass it through untouched; attention reads the
        # groups' own masks instead.
        hidden = self._hidden(batch.input_ids, batch.positions, self._no_mask, batch.read)
        firsts = batch.firsts
        self._score_prompts(rows, lambda i, lo, hi: hidden[0, firsts[i] + lo : firsts[i] + hi])
        if not batch.last_tokens.numel():
            return hidden.new_zeros((0, self.spec.vocab_size), dtype=torch.float32)
        return self._logits(hidden[0, batch.last_tokens])

    def _padded_forward(self, rows: Sequence[ScheduledRow]) -> torch.Tensor:
        """Rows right-padded to the longest chunk, each read up to the longest row."""
        device, block_size = self.device, self.block_size
        requests = [row.request for row in rows]
        fed = [row.request.token_ids(row.request.num_cached, row.num_tokens) for row in rows]
        lengths = torch.tensor([row.num_tokens for row in rows], device=device)
        starts = torch.tensor([r.next_position for r in requests], device=device)
        q_len = max(row.num_tokens for row in rows)
        end = max(row.request.next_position + row.num_tokens for row in rows)
        bucket = self.kv_len_bucket
        num_read_blocks = -(-end // bucket) * bucket // block_size
        tables = torch.tensor(
            [
                r.block_table + [ZERO_BLOCK] * (num_read_blocks - len(r.block_table))
                for r in requests
            ],
            device=device,
        )

        offsets = torch.arange(q_len, device=device)[None, :]
        real = offsets < lengths[:, None]
        positions = torch.where(real, starts[:, None] + offsets, 0)
        input_ids = torch.zeros(real.shape, dtype=torch.long, device=device)
        input_ids[real] = torch.tensor([t for tokens in fed for t in tokens], device=device)
        own_slots = tables.gather(1, positions // block_size) * block_size + positions % block_size
        scratch = SCRATCH_BLOCK * block_size + offsets % block_size
        self.cache.bind(torch.where(real, own_slots, scratch), tables)
        hidden = self._hidden(input_ids, positions, self._mask(positions, tables))
        self._score_prompts(rows, lambda i, lo, hi: hidden[i, lo:hi])
        picked = [i for i, row in enumerate(rows) if row.samples]
        if not picked:
            return hidden.new_zeros((0, self.spec.vocab_size), dtype=torch.float32)
        index = torch.tensor(picked, device=device)
        return self._logits(hidden[index, lengths[index] - 1])

    def decode_forward(self, buffers: DecodeBuffers) -> torch.Tensor:
        """`buffers.logits` of a decode forward that reads its inputs from `buffers` alone and
        never syncs with the host: the static path's forward, which a CUDA graph captures as
        is. The same arithmetic as `forward`'s."""
        self.cache.bind(buffers.write_slots, buffers.tables)
        mask = self._mask(buffers.positions, buffers.tables)
        hidden = self._hidden(buffers.input_ids, buffers.positions, mask)
        logits = buffers.logits
        logits.copy_(self.lm_head(hidden[:, 0]))  # the cast to float32, into the static output
        if self.softcap:
            logits.div_(self.softcap).tanh_().mul_(self.softcap)
        return logits

    def _hidden(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | BlockMask,
        step: bool | GroupedRead = True,
    ) -> torch.Tensor:
        """The decoder over the bound cache: each row at its own positions, under its mask
        (`step`: the engine's sdpa reads rows group by group, kv_cache.GroupedRead)."""
        return self.decoder(
            input_ids=input_ids,
            position_ids=positions,
            attention_mask=mask,
            past_key_values=self.cache,
            use_cache=True,
            engine_step=step,
        ).last_hidden_state

    def _logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(last_hidden).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _mask(self, positions: torch.Tensor, tables: torch.Tensor) -> torch.Tensor | BlockMask:
        if self.paged_mask is not None:
            return self.paged_mask.build(tables, positions)
        keys = torch.arange(tables.shape[1] * self.block_size, device=self.device)
        visible = (keys[None, None, :] <= positions[:, :, None])[:, None]  # [B, 1, q, kv]
        blocked = torch.finfo(self.dtype).min
        return torch.zeros(visible.shape, dtype=self.dtype, device=self.device).masked_fill(
            ~visible, blocked
        )
