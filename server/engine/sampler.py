"""Per-row sampling: greedy, temperature, top-k, top-p, each row with its own seeded generator.

Rows are independent: a row's token depends only on its own logits and its own generator, never
on what else shares the batch. Sampling draws exponential noise and takes argmax(p / noise)
(the "exponential race"), which equals sampling from p and needs no host sync per row.

Everything runs on the logits' device: the rows' parameters travel in one packed host-to-device
copy, and each row's noise comes from its own generator on that device. Greedy rows cost one
argmax and nothing else; the caller reads the ids back once for the whole step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from server.engine.request import Request, SamplingParams


def sample(logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
    """`logits [B, V]` (float32) -> next token ids `[B]`, on the logits' device."""
    next_ids = logits.argmax(dim=-1)
    sampled = [i for i, r in enumerate(requests) if not r.sampling.greedy]
    if not sampled:
        return next_ids
    device = logits.device
    params = [requests[i].sampling for i in sampled]
    rows, temperature, top_k, top_p = _packed(sampled, params, device)
    scaled = logits[rows] / temperature[:, None]
    if any(p.top_k > 0 or p.top_p < 1 for p in params):
        probs = _filtered_probs(scaled, top_k=top_k, top_p=top_p)
    else:  # no cut: the sort over the vocabulary would change nothing
        probs = scaled.softmax(dim=-1)
    noise = torch.empty_like(probs)
    for row, i in enumerate(sampled):
        noise[row].exponential_(generator=requests[i].generator(device))
    next_ids[rows] = (probs / noise).argmax(dim=-1)
    return next_ids


def _packed(
    rows: list[int], params: list[SamplingParams], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row indices, temperatures, top-k and top-p of the sampled rows, moved in one copy.

    float32 holds every index and top-k exactly (both are below 2**24: rows and vocabulary)."""
    host = torch.tensor(
        [
            rows,
            [p.temperature for p in params],
            [p.top_k for p in params],
            [p.top_p for p in params],
        ],
        dtype=torch.float32,
    )
    if device.type == "cuda":
        host = host.pin_memory()  # lets the copy run without blocking the host
    packed = host.to(device, non_blocking=True)
    return packed[0].long(), packed[1], packed[2].long(), packed[3]


def _filtered_probs(
    logits: torch.Tensor, *, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Softmax of (temperature-scaled) logits with each row's top-k and top-p cuts applied."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    rank = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
    drop = rank >= k[:, None]
    sorted_probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    # Keep the smallest set whose mass reaches top_p: drop a token when the mass before it does.
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop |= mass_before >= top_p[:, None]
    drop[:, 0] = False  # always keep the most likely token
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    filtered = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return filtered.softmax(dim=-1)
