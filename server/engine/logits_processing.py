"""Per-row logits processing before sampling: logit bias, minimum tokens and penalties.

Each row carries its own settings (request.SamplingParams); the batch's rows are processed
together, one tensor operation per kind for every row that uses it, on the logits' device.
Rows that use none of them cost nothing. In this order, as transformers' processors compose when
listed so (the tests hold the engine to them):

1. `logit_bias`: OpenAI's, a value added to a token's logit.
2. `min_tokens`: EOS and the request's stop token ids get -inf until that many tokens exist
   (transformers' MinNewTokensLengthLogitsProcessor).
3. `repetition_penalty`: transformers' (CTRL's): every token in the prompt or the output has its
   logit divided by the penalty when positive, multiplied when negative.
4. `frequency_penalty` and `presence_penalty`: OpenAI's, over the output only:
   logit - count * frequency - (count > 0) * presence.

Log-probabilities are read before any of this (logprobs.py): they describe the model, not the
request's settings.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from server.engine.request import Request


def process_logits(
    logits: torch.Tensor, requests: Sequence[Request], eos_token_ids: frozenset[int]
) -> torch.Tensor:
    """`logits [S, V]` with each row's processing applied; the same tensor when no row has any
    (else a copy: the caller keeps the model's own logits)."""
    rows = [i for i, r in enumerate(requests) if r.sampling.processes_logits]
    if not rows:
        return logits
    processed = logits.clone()
    device, vocab = logits.device, logits.shape[-1]
    _add_bias(processed, requests, rows, device)
    _mask_early_stops(processed, requests, rows, eos_token_ids, vocab, device)
    repeating = [i for i in rows if requests[i].sampling.repetition_penalty != 1.0]
    if repeating:
        seen = _token_counts(
            [requests[i].prompt_token_ids + requests[i].output_token_ids for i in repeating],
            vocab,
            device,
        ).bool()
        index = torch.tensor(repeating, device=device)
        penalty = _column([requests[i].sampling.repetition_penalty for i in repeating], device)
        scores = processed[index]
        penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
        processed[index] = torch.where(seen, penalised, scores)
    counting = [i for i in rows if _counts_output(requests[i])]
    if counting:
        counts = _token_counts([requests[i].output_token_ids for i in counting], vocab, device)
        index = torch.tensor(counting, device=device)
        frequency = _column([requests[i].sampling.frequency_penalty for i in counting], device)
        presence = _column([requests[i].sampling.presence_penalty for i in counting], device)
        processed[index] -= counts * frequency + (counts > 0).float() * presence
    return processed


def _counts_output(request: Request) -> bool:
    return bool(request.sampling.frequency_penalty or request.sampling.presence_penalty)


def _add_bias(
    logits: torch.Tensor, requests: Sequence[Request], rows: list[int], device: torch.device
) -> None:
    entries = [(i, token, bias) for i in rows for token, bias in requests[i].sampling.logit_bias]
    if not entries:
        return
    row_ids, token_ids, values = zip(*entries, strict=True)
    index = (torch.tensor(row_ids, device=device), torch.tensor(token_ids, device=device))
    logits.index_put_(index, torch.tensor(values, device=device), accumulate=True)


def _mask_early_stops(
    logits: torch.Tensor,
    requests: Sequence[Request],
    rows: list[int],
    eos_token_ids: frozenset[int],
    vocab: int,
    device: torch.device,
) -> None:
    entries = [
        (i, token)
        for i in rows
        if len(requests[i].output_token_ids) < requests[i].sampling.min_tokens
        for token in sorted(eos_token_ids | set(requests[i].sampling.stop_token_ids))
        if 0 <= token < vocab
    ]
    if entries:
        row_ids, token_ids = zip(*entries, strict=True)
        index = (torch.tensor(row_ids, device=device), torch.tensor(token_ids, device=device))
        logits[index] = float("-inf")


def _token_counts(token_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """`[len(token_lists), vocab]` float counts of each token in each list: one index copy and
    one scatter for all of them."""
    rows = [row for row, tokens in enumerate(token_lists) for _ in tokens]
    tokens = [token for tokens in token_lists for token in tokens]
    index = torch.tensor([rows, tokens], dtype=torch.long).to(device)
    counts = torch.zeros((len(token_lists), vocab), device=device)
    counts.index_put_((index[0], index[1]), torch.ones(len(tokens), device=device), accumulate=True)
    return counts


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)[:, None]
