"""Structured outputs: each constrained row decodes under its own grammar, in any batch.

A constraint (a JSON schema, any JSON object, a regular expression, a choice of strings, or a
Lark grammar) is compiled once per content by `GrammarCompiler` into a `Grammar`: llguidance's
grammar over the model's tokenizer, checked (a constraint llguidance refuses, or one past its
size and work limits, is an `InvalidRequest` naming the problem). Each request that carries one
gets its own `GrammarState` (an llguidance matcher). Before sampling, every constrained row's
state fills its row of a token bitmask (the tokens that keep the output a prefix of some valid
answer; EOS only once the answer is complete), and the disallowed tokens' logits become -inf
on the logits' device; after sampling, the chosen token advances the state.

llguidance was chosen over xgrammar on this project's CPU (docs/api.md, "Structured outputs"):
it compiles lazily (a schema costs well under a millisecond to a few milliseconds instead of up
to hundreds), bounds the work of every mask by its parser limits, and is one dependency-free
wheel. Its masks are filled on the host while the forward runs (`MaskFiller`).

Preemption and recompute keep a request's output, so its state stays valid; a step that fails
advances no state (tokens are accepted only once a step succeeded).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import llguidance
import llguidance.hf
import llguidance.numpy
import numpy as np
import torch

from server.engine.request import InvalidRequest

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")


# llguidance's own limits, tighter than its defaults where a hostile grammar could make one
# row's mask slow: the grammar's size, and the lexer and parser work of one token's mask.
def parser_limits() -> llguidance.LLParserLimits:
    return llguidance.LLParserLimits(
        max_grammar_size=200_000,
        initial_lexer_fuel=1_000_000,
        step_lexer_fuel=200_000,
        step_max_items=50_000,
        max_lexer_states=100_000,
    )


CACHE_SIZE = 256  # compiled grammars kept, by content
# Whitespace between JSON tokens: any layout, but at most this much at a time, so a small model
# cannot pad an answer with whitespace until it runs out of tokens.
JSON_OPTIONS: Any = {"whitespace_pattern": r"[\n\t ]{0,20}"}  # llguidance's JsonCompileOptions


@dataclass(frozen=True, eq=False)
class Grammar:
    """A checked constraint over one tokenizer; shared by every request that uses it."""

    kind: str
    source: str  # llguidance's grammar (its JSON form)
    tokenizer: llguidance.LLTokenizer
    # The parser at the start of an answer, checked at compile time; never advanced. Copying it
    # is about 8x cheaper than building a parser, and a request's state is made on the engine's
    # thread.
    start: llguidance.LLMatcher

    def state(self) -> GrammarState:
        return GrammarState(self, self.start.deep_copy())


class GrammarState:
    """One request's position in its grammar."""

    def __init__(self, grammar: Grammar, matcher: llguidance.LLMatcher) -> None:
        self.grammar = grammar
        self.matcher = matcher

    def accept(self, token: int) -> bool:
        """Advance by `token`; False when the grammar does not allow it or the parser fails
        (the state is then unusable: the request fails, alone)."""
        try:
            return bool(self.matcher.consume_token(token))
        except BaseException as exc:  # a Rust panic arrives as a BaseException
            if not is_parser_failure(exc):
                raise
            return False

    def fill(self, bitmask: np.ndarray, row: int) -> None:
        """This state's allowed tokens into `bitmask[row]`; none when the parser fails (the
        row then samples a token its grammar refuses, and fails alone in `accept`)."""
        try:
            llguidance.numpy.fill_next_token_bitmask(self.matcher, bitmask, row)
        except BaseException as exc:
            if not is_parser_failure(exc):
                raise
            bitmask[row] = 0

    @property
    def error(self) -> str:
        """llguidance's reason, without the parser state it dumps after it."""
        lines = str(self.matcher.get_error()).strip().splitlines()
        return lines[0][:500] if lines else "the grammar allows no further token"

    @property
    def complete(self) -> bool:
        """The output so far is a whole valid answer."""
        return bool(self.matcher.is_accepting())


def is_parser_failure(exc: BaseException) -> bool:
    """An error of the parser's own (an exception, or a Rust panic surfacing as pyo3's
    PanicException, a BaseException), as opposed to the process being interrupted."""
    return isinstance(exc, Exception) or type(exc).__name__ == "PanicException"


class GrammarCompiler:
    """Constraints compiled over one model's tokenizer, cached by content. Thread-safe: the
    server compiles off its event loop."""

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        eos_token_ids: frozenset[int] = frozenset(),
        cache_size: int = CACHE_SIZE,
    ) -> None:
        """`eos_token_ids`: the tokens the engine stops on, the only ones a complete answer
        allows (the tokenizer's own EOS when empty)."""
        self._hf_tokenizer = tokenizer
        self._eos_token_ids = eos_token_ids
        self._cache_size = cache_size
        self._vocab_size = vocab_size
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[str, Grammar] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:  # built on first use: about half a second for a 49k vocabulary
            if self._tokenizer is None:
                eos = sorted(self._eos_token_ids) or None
                try:
                    self._tokenizer = llguidance.hf.from_tokenizer(
                        self._hf_tokenizer, n_vocab=self._vocab_size, eos_token=eos
                    )
                except (ValueError, TypeError) as exc:  # e.g. a slow (Python) tokenizer
                    raise InvalidRequest(f"constraints: this model's tokenizer: {exc}") from None
            return self._tokenizer

    def compile(self, kind: str, value: Any) -> Grammar:
        """`value`: a JSON schema (dict) for json_schema, ignored for json_object, a regular
        expression, a list of strings for choice, Lark text for grammar."""
        # Not sort_keys: a schema's properties are generated in the order it lists them.
        key = json.dumps([kind, value])
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        grammar = _checked(kind, _source(kind, value), self.tokenizer)
        with self._lock:
            self._cache[key] = grammar
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return grammar


def _source(kind: str, value: Any) -> str:
    try:
        if kind == "json_schema":
            return str(llguidance.LLMatcher.grammar_from_json_schema(value, overrides=JSON_OPTIONS))
        if kind == "json_object":
            return str(
                llguidance.LLMatcher.grammar_from_json_schema(
                    {"type": "object"}, overrides=JSON_OPTIONS
                )
            )
        if kind == "regex":
            return str(llguidance.LLMatcher.grammar_from_regex(value))
        if kind == "choice":
            if not value or not all(isinstance(c, str) and c for c in value):
                raise InvalidRequest("choice: expected non-empty strings")
            return str(llguidance.grammar_from("choice", json.dumps(value)))
        if kind == "grammar":
            return str(llguidance.LLMatcher.grammar_from_lark(value))
    except (ValueError, TypeError) as exc:
        raise InvalidRequest(f"{kind}: {_first_line(str(exc))}") from None
    raise InvalidRequest(f"constraint: expected one of {', '.join(KINDS)}, found {kind}")


def _checked(kind: str, source: str, tokenizer: llguidance.LLTokenizer) -> Grammar:
    """The grammar, once llguidance can run it: refused when invalid, too large, or when its
    first mask exceeds the limits or allows nothing (an answer that cannot even start)."""
    error = llguidance.LLMatcher.validate_grammar(source, tokenizer)
    if error:
        raise InvalidRequest(f"{kind}: {_first_line(error)}")
    start = llguidance.LLMatcher(tokenizer, source, log_level=0, limits=parser_limits())
    grammar = Grammar(kind, source, tokenizer, start)
    bitmask = llguidance.numpy.allocate_token_bitmask(1, tokenizer.vocab_size)
    if not start.is_error():
        GrammarState(grammar, start).fill(bitmask, 0)  # computes, never advances
    if start.is_error():
        raise InvalidRequest(f"{kind}: {_first_line(str(start.get_error()))}")
    if not bitmask.any():
        raise InvalidRequest(f"{kind}: no token can start an answer")
    return grammar


def _first_line(message: str) -> str:
    """llguidance's message on one line (it points at the problem over several)."""
    joined = " ".join(line.strip() for line in message.strip().splitlines() if line.strip())
    return joined[:500] or "invalid"


class MaskFiller:
    """Fills the constrained rows' bitmasks on a host thread (llguidance releases the GIL), so
    the work overlaps the step's forward; `apply` waits for it and masks the logits."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self._executor: ThreadPoolExecutor | None = None

    def start(self, requests: Sequence[Any]) -> Future[dict[int, np.ndarray]] | None:
        """Begin filling each constrained request's mask (by `id(request)`); None if none is."""
        # A lockstep group's rows all take its leader's token: only the leader's mask counts.
        constrained = [
            r
            for r in requests
            if (r.lockstep_group is None or r is r.lockstep_group.leader)
            and r.grammar_state() is not None
        ]
        if not constrained:
            return None
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")
        return self._executor.submit(self._fill, constrained)

    def _fill(self, requests: list[Any]) -> dict[int, np.ndarray]:
        bitmask = llguidance.numpy.allocate_token_bitmask(len(requests), self.vocab_size)
        for row, request in enumerate(requests):
            request.grammar_state().fill(bitmask, row)
        return {id(request): bitmask[row] for row, request in enumerate(requests)}


def apply_masks(
    logits: torch.Tensor, requests: Sequence[Any], masks: dict[int, np.ndarray]
) -> torch.Tensor:
    """`logits [S, V]` with each masked row's disallowed tokens at -inf (a copy when any row is
    masked; `logits` itself when none)."""
    rows = [i for i, r in enumerate(requests) if id(r) in masks]
    if not rows:
        return logits
    vocab = logits.shape[-1]
    packed = torch.from_numpy(np.stack([masks[id(requests[i])] for i in rows]))
    bits = torch.arange(32, dtype=torch.int32)
    allowed = ((packed[:, :, None] >> bits) & 1).bool().reshape(len(rows), -1)[:, :vocab]
    index = torch.tensor(rows, device=logits.device)
    masked = logits.clone()
    masked[index] = masked[index].masked_fill(~allowed.to(logits.device), float("-inf"))
    return masked
