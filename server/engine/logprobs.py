"""Log-probabilities of chosen and prompt tokens, and their most likely alternatives.

Every log-probability is the model's own next-token distribution, with the row's prefix, at
temperature 1, before logit bias, penalties, minimum tokens and top-k / top-p (as vLLM and
OpenAI report them); a `mean` ensemble's is that of its averaged distribution (ensemble.py).

Prompt tokens are scored while the prompt is prefilled, chunk by chunk, only for the rows that
ask: PROMPT_SCORE_POSITIONS positions at a time go through the output layer, so a long prompt
never makes a whole prompt x vocabulary tensor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Positions whose logits exist at once while scoring a prompt: 256 x a 49,152-token vocabulary
# is 48 MiB of float32 (and as much for its log-softmax).
PROMPT_SCORE_POSITIONS = 256

TopLogprobs = list[tuple[int, float]]  # (token id, log-prob), most likely first


ChosenLogprobs = tuple[float, TopLogprobs]  # a chosen token's log-prob, its alternatives


def chosen_tensor(log_probs: torch.Tensor, chosen: torch.Tensor, most: int) -> torch.Tensor:
    """`log_probs [W, V]` and `chosen [W]` -> one float64 vector to read in one go: each row's
    chosen token's log-prob, then each row's `most` top log-probs, then their token ids
    (float64 holds every token id exactly)."""
    picked = log_probs.gather(1, chosen[:, None].clamp(min=0))[:, 0].double()
    if most == 0:
        return picked
    values, ids = log_probs.topk(most, dim=-1)
    return torch.cat([picked, values.double().flatten(), ids.double().flatten()])


def unpack_chosen(host: list[float], top: list[int]) -> list[ChosenLogprobs]:
    """`chosen_tensor`'s values read back, each row with its own `top[row]` alternatives."""
    rows, most = len(top), max(top, default=0)
    values = host[rows : rows + rows * most]
    ids = host[rows + rows * most :]
    return [
        (host[r], [(int(ids[r * most + j]), values[r * most + j]) for j in range(top[r])])
        for r in range(rows)
    ]


def score_tokens(
    hidden: torch.Tensor,
    targets: list[int],
    top: int,
    to_logits: Callable[[torch.Tensor], torch.Tensor],
) -> list[ChosenLogprobs]:
    """The log-prob of `targets[i]` after the position whose hidden state is `hidden[i]`, with
    the `top` most likely tokens there, PROMPT_SCORE_POSITIONS positions at a time."""
    scored: list[ChosenLogprobs] = []
    for start in range(0, len(targets), PROMPT_SCORE_POSITIONS):
        end = min(start + PROMPT_SCORE_POSITIONS, len(targets))
        # In place: one positions x vocabulary tensor at a time, the logits themselves
        # (to_logits makes a new tensor).
        log_probs = to_logits(hidden[start:end])
        log_probs -= log_probs.logsumexp(dim=-1, keepdim=True)
        wanted = torch.tensor(targets[start:end], device=log_probs.device)
        host = chosen_tensor(log_probs, wanted, top).tolist()
        del log_probs  # before the next chunk's logits exist
        scored += unpack_chosen(host, [top] * (end - start))
    return scored
