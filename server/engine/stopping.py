"""After each new token: decide whether the request is finished, and release its new text."""

from __future__ import annotations

from typing import Any

from server.engine.request import Request

REPLACEMENT_CHAR = "\ufffd"  # what a byte-level tokenizer decodes half a character to


def append_token(
    request: Request, token: int, *, eos_token_ids: frozenset[int], max_len: int
) -> None:
    """Record a sampled token and set `finish_reason` when the ids alone say the request is done."""
    request.output_token_ids.append(token)
    sampling = request.sampling
    if token in sampling.stop_token_ids or (token in eos_token_ids and not sampling.ignore_eos):
        request.finish("stop")
    elif (
        len(request.output_token_ids) >= sampling.max_new_tokens
        or request.prefix_len + request.num_tokens > max_len  # no position left to feed it back
    ):
        request.finish("length")


def update_text(request: Request, tokenizer: Any) -> str:
    """Decode the output, apply stop strings, and return the text released since the last call.

    Text that may still change is held back while the request runs: a trailing half character,
    and a tail that could be the start of a stop string.
    """
    if tokenizer is None:
        return ""
    stop = request.sampling.stop
    if not (stop or request.stream_text or request.finished):
        return ""  # nobody looks at the text before the end
    text = decode(tokenizer, request.output_token_ids)
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    if hits:
        text = text[: min(hits)]
        request.finish("stop")
    ready = len(text)
    if not request.finished:
        ready -= _possible_stop_start(text, stop)
        while ready > 0 and text[ready - 1] == REPLACEMENT_CHAR:
            ready -= 1
    ready = max(ready, len(request.text))
    delta = text[len(request.text) : ready]
    request.text = text[:ready]
    return delta


def _possible_stop_start(text: str, stop: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that some stop string begins with."""
    for size in range(max((len(s) for s in stop), default=1) - 1, 0, -1):
        tail = text[-size:]
        if len(tail) == size and any(s.startswith(tail) for s in stop):
            return size
    return 0


def decode(tokenizer: Any, token_ids: list[int]) -> str:
    return str(tokenizer.decode(token_ids, skip_special_tokens=True))
