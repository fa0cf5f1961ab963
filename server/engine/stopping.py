"""After each new token: decide whether the request is finished, and release its new text."""

from __future__ import annotations

from typing import Any

from server.engine.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer, decode
from server.engine.request import ConstraintFailed, Request


def append_token(
    request: Request, token: int, *, eos_token_ids: frozenset[int], max_len: int
) -> None:
    """Record a sampled token and set `finish_reason` when the ids alone say the request is done."""
    state = request.grammar_state()  # before the token is recorded: it replays what is
    request.output_token_ids.append(token)
    sampling = request.sampling
    if state is not None and not state.accept(token):  # its grammar outgrew its limits
        failure = ConstraintFailed(f"the constraint could not be followed: {state.error}")
        request.finish("error", failure)
    elif token in sampling.stop_token_ids or (token in eos_token_ids and not sampling.ignore_eos):
        request.finish("stop")
    elif (
        len(request.output_token_ids) >= sampling.max_new_tokens
        or request.prefix_len + request.num_tokens > max_len  # no position left to feed it back
    ):
        request.finish("length")


def update_text(request: Request, tokenizer: Any) -> str:
    """Decode the new tokens, apply stop strings, and return the text released since the last call.

    Text that may still change is held back while the request runs: a trailing half character,
    and a tail that could be the start of a stop string. Each call decodes only the last few
    tokens and searches only the new text for stop strings, so a step costs the same at any
    output length.
    """
    if tokenizer is None:
        return ""
    if not (request.sampling.stop or request.stream_text):
        return _release_at_finish(request, tokenizer)  # nobody looks at the text before the end
    if request.detok is None:
        request.detok = IncrementalDetokenizer.for_tokenizer(tokenizer)
    text = _decode_to_stop(request, tokenizer, request.detok)
    return _release(request, request.detok, text)


def _decode_to_stop(request: Request, tokenizer: Any, detok: IncrementalDetokenizer) -> str:
    """Decode the new tokens; return `detok.text` cut at a stop string, finishing the request
    when one is found."""
    changed_from = detok.push(tokenizer, request.output_token_ids, final=request.finished)
    stop = request.sampling.stop
    text = detok.text
    if len(request.output_token_ids) < request.sampling.min_tokens:
        return text  # stop strings count only from min_tokens on (EOS is masked till then)
    # The text before `changed_from` held no stop string last time: only one ending after it can
    # be new, and it starts at most (longest stop string - 1) characters before it.
    cut = _find_stop(text, max(changed_from - _longest(stop) + 1, 0), stop)
    if cut is None:
        return text
    request.finish("stop")
    return text[:cut]


def _release(request: Request, detok: IncrementalDetokenizer, text: str) -> str:
    """Release what of `text` (the output's text from `detok.start` on) can go out now."""
    released = len(request.text) - detok.start
    ready = len(text) if request.finished else _releasable(text, request.sampling.stop)
    delta = text[released : max(ready, released)]
    request.text += delta
    # Keep what is not released yet, and enough before the end for a stop string spanning steps.
    stable_end = detok.start + len(detok.stable)
    detok.keep_from(min(len(request.text), stable_end - _longest(request.sampling.stop) + 1))
    return delta


def _release_at_finish(request: Request, tokenizer: Any) -> str:
    """The whole text at once, for a request whose text nobody reads before it finishes."""
    if not request.finished:
        return ""
    text = decode(tokenizer, request.output_token_ids)
    delta = text[len(request.text) :]
    request.text = text
    return delta


def _find_stop(text: str, begin: int, stop: tuple[str, ...]) -> int | None:
    """Where the first stop string starting at or after `begin` starts, if any does."""
    hits = [i for i in (text.find(s, begin) for s in stop) if i >= 0]
    return min(hits) if hits else None


def _releasable(text: str, stop: tuple[str, ...]) -> int:
    """How much of a running request's text can go out: not a trailing half character (its other
    bytes may still come), nor a tail before it that could be the start of a stop string."""
    ready = len(text)
    while ready > 0 and text[ready - 1] == REPLACEMENT_CHAR:
        ready -= 1
    return ready - _possible_stop_start(text, ready, stop)


def _possible_stop_start(text: str, end: int, stop: tuple[str, ...]) -> int:
    """Length of the longest tail of `text[:end]` that some stop string begins with."""
    for size in range(min(_longest(stop) - 1, end), 0, -1):
        tail = text[end - size : end]
        if any(s.startswith(tail) for s in stop):
            return size
    return 0


def _longest(stop: tuple[str, ...]) -> int:
    return max((len(s) for s in stop), default=1)
