"""Per-row sampling: greedy, temperature, top-k, top-p, each row with its own seeded generator.

Rows are independent: a row's token depends only on its own logits and its own generator, never
on what else shares the batch. Sampling draws exponential noise and takes argmax(p / noise)
(the "exponential race"), which equals sampling from p and needs no host sync per row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from server.engine.request import Request


def sample(logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
    """`logits [B, V]` (float32) -> next token ids `[B]`."""
    next_ids = logits.argmax(dim=-1)
    sampled = [i for i, r in enumerate(requests) if not r.sampling.greedy]
    if not sampled:
        return next_ids
    rows = torch.tensor(sampled, device=logits.device)
    params = [requests[i].sampling for i in sampled]
    probs = _filtered_probs(
        logits[rows],
        temperature=torch.tensor([p.temperature for p in params], device=logits.device),
        top_k=torch.tensor([p.top_k for p in params], device=logits.device),
        top_p=torch.tensor([p.top_p for p in params], device=logits.device),
    )
    noise = torch.stack(
        [torch.empty(probs.shape[1]).exponential_(generator=requests[i].generator) for i in sampled]
    ).to(probs.device)
    next_ids[rows] = (probs / noise).argmax(dim=-1)
    return next_ids


def _filtered_probs(
    logits: torch.Tensor, *, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Softmax of temperature-scaled logits with each row's top-k and top-p cuts applied."""
    logits = logits / temperature[:, None]
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
