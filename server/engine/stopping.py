"""Decide when a request is finished after each new token: stop ids, EOS, stop strings, length."""

from __future__ import annotations

from typing import Any

from server.engine.request import Request


def append_token(
    request: Request, token: int, *, eos_token_ids: frozenset[int], max_len: int, tokenizer: Any
) -> None:
    """Record a sampled token and set `finish_reason` when the request is done."""
    request.output_token_ids.append(token)
    sampling = request.sampling
    if token in sampling.stop_token_ids or (token in eos_token_ids and not sampling.ignore_eos):
        request.finish_reason = "stop"
    elif (
        len(request.output_token_ids) >= sampling.max_new_tokens
        or request.prefix_len + request.num_tokens > max_len  # no position left to feed it back
    ):
        request.finish_reason = "length"
    if sampling.stop and tokenizer is not None:
        # Stop strings can span tokens, so they are searched in the decoded text.
        text = decode(tokenizer, request.output_token_ids)
        hits = [i for i in (text.find(s) for s in sampling.stop) if i >= 0]
        if hits:
            request.text = text[: min(hits)]
            request.finish_reason = "stop"
            return
    if request.finished and tokenizer is not None:
        request.text = decode(tokenizer, request.output_token_ids)


def decode(tokenizer: Any, token_ids: list[int]) -> str:
    return str(tokenizer.decode(token_ids, skip_special_tokens=True))
