"""All per-request state in one place: sampling parameters, prefix, slot, tokens, outcome."""

from __future__ import annotations

import enum
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from prefixes import CompiledPrefix

if TYPE_CHECKING:
    from server.engine.detokenizer import IncrementalDetokenizer
    from server.engine.grammar import Grammar, GrammarState

_ids = itertools.count()

MAX_LOGPROBS = 20  # top log-probabilities per token, as OpenAI and vLLM allow


class InvalidRequest(ValueError):
    """A request this engine can never run (the message names the field): the caller's error."""


class RequestFailed(Exception):
    """The engine could not finish this request (its prefix failed to load, a step failed)."""


class ConstraintFailed(RequestFailed):
    """This request's constraint could not be followed (its grammar outgrew the parser's
    limits mid-answer): the sender's own doing, and it fails alone."""


class NonFiniteOutput(RequestFailed):
    """This request's own values overflowed to NaN or Inf (a prefix with extreme values): it
    fails alone, and the rows beside it are untouched."""


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # Log-probabilities (logprobs.py): None asks for none; k >= 0 records each chosen (or prompt)
    # token's and the k most likely ones'. The model's own distribution, with the prefix, before
    # any penalty, bias or temperature.
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    # Logits processing (logits_processing.py), in this order: logit_bias, min_tokens,
    # repetition_penalty (transformers'), then frequency and presence penalties (OpenAI's).
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0  # EOS and stop_token_ids are masked until this many tokens exist
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    # Structured outputs (grammar.py): only tokens that keep the output a prefix of a valid
    # answer, and EOS once it is complete.
    grammar: Grammar | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise InvalidRequest(f"max_new_tokens: expected >= 0, found {self.max_new_tokens}")
        if self.max_new_tokens == 0 and self.prompt_logprobs is None:
            raise InvalidRequest(
                "max_new_tokens: 0 only scores the prompt; ask for its log-probabilities"
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise InvalidRequest(f"{name}: expected 0 to {MAX_LOGPROBS}, found {value}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise InvalidRequest(
                f"repetition_penalty: expected a number > 0, found {self.repetition_penalty}"
            )
        for name in ("frequency_penalty", "presence_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise InvalidRequest(f"{name}: expected a finite number")
        if self.min_tokens < 0:
            raise InvalidRequest(f"min_tokens: expected >= 0, found {self.min_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise InvalidRequest(
                f"temperature: expected a finite number >= 0, found {self.temperature}"
            )
        if not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p: expected a number in (0, 1], found {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k: expected >= 0, found {self.top_k}")
        if any(not s for s in self.stop):
            raise InvalidRequest("stop: expected non-empty strings, found an empty string")
        if self.grammar is not None and self.ignore_eos:
            raise InvalidRequest("ignore_eos: not with a constraint (its answer ends with EOS)")
        if self.grammar is not None and self.min_tokens:
            raise InvalidRequest(
                "min_tokens: not with a constraint (the grammar decides where its answer ends)"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def processes_logits(self) -> bool:
        """Anything between the model's logits and sampling besides temperature and cuts."""
        return bool(
            self.logit_bias
            or self.min_tokens
            or self.repetition_penalty != 1.0
            or self.frequency_penalty
            or self.presence_penalty
        )


@dataclass(eq=False)
class RequestGroup:
    """Rows of one request that the scheduler admits together (a prompt ensemble: the same
    prompt under several prefixes). A `lockstep` group also advances together: every step feeds
    all its rows the same number of tokens, their next token is chosen once from the mean of
    their log-softmax distributions (with the leader's sampling and generator) and appended to
    every row, and when one row finishes they all do. The leader, `members[0]`, stands for the
    group in the waiting queue and carries the output the caller reads.
    """

    members: list[Request]
    lockstep: bool
    admitted: bool = False  # once admitted, the rows of a group that is not lockstep go alone
    # `n` choices of one prompt under one prefix: only the leader is fed the prompt; the
    # others wait (holding their slots) and, in the step the leader samples its first token,
    # sample theirs from the same logits and take its prompt's blocks (shared, the partial last
    # one copied). Until then the group is admitted, preempted and cancelled as one.
    shares_prompt: bool = False
    forked: bool = False

    def __post_init__(self) -> None:
        if self.lockstep and self.shares_prompt:
            raise ValueError("a lockstep group feeds every row: it cannot share one prompt")
        for member in self.members:
            member.group = self

    @property
    def waits_for_fork(self) -> bool:
        return self.shares_prompt and not self.forked

    @property
    def leader(self) -> Request:
        return self.members[0]


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and queued again to recompute
    RUNNING = "running"  # holds KV blocks and is fed every step
    FINISHED = "finished"  # retired: holds nothing in the engine any more


@dataclass(eq=False)
class Request:
    """One generation. Storage index == position: the prefix sits at positions 0..T-1 and the
    request's own tokens (prompt, then output) at T, T+1, ...; `block_table` says where each
    position lives in the KV pool.
    """

    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    prefix: CompiledPrefix | None = None
    tenant: str = "default"
    # Called once when the request leaves the engine: releases the pinned prefix version.
    release: Callable[[], None] | None = field(default=None, repr=False)
    # Called once with the request when it leaves the engine, its outcome and output final:
    # where its usage is counted (server/api/usage.py).
    on_finish: Callable[[Request], None] | None = field(default=None, repr=False)
    # Decode text every step (streaming) rather than once at the end.
    stream_text: bool = False
    # Record the log-probability the model gave each chosen token (at temperature 1, before any
    # top-k / top-p cut) even if sampling.logprobs does not ask: what an ensemble's vote breaks
    # ties with.
    vote_logprobs: bool = False
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    status: RequestStatus = RequestStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_cached: int = 0  # own tokens whose K/V are in the cache
    num_preemptions: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)  # with `records_logprobs`
    # With sampling.logprobs: each output token's most likely alternatives, (id, log-prob).
    output_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    # With sampling.prompt_logprobs: prompt token i (i >= 1) given what precedes it, at index
    # i - 1, as (its log-prob, its top alternatives); filled chunk by chunk during prefill.
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    group: RequestGroup | None = field(default=None, repr=False)  # set by RequestGroup
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: RequestFailed | None = None  # why it failed, when finish_reason is "error"
    text: str = ""  # text released so far (without a stop string)
    # Decoding state of a request whose text is read while it runs (streamed, or stop strings).
    detok: IncrementalDetokenizer | None = field(default=None, repr=False)
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    last_token_time: float | None = None
    # Every row draws from its own generator, so a seeded request samples the same tokens
    # whatever else shares its batch. Made on first use, on the device the logits are on.
    _generator: torch.Generator | None = field(default=None, init=False, repr=False)
    _grammar_state: GrammarState | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise InvalidRequest("prompt: expected at least one token, found none")

    def grammar_state(self) -> GrammarState | None:
        """Where this request's output stands in its grammar (made on first use), or None."""
        if self.sampling.grammar is None:
            return None
        if self._grammar_state is None:
            self._grammar_state = self.sampling.grammar.state()
            for token in self.output_token_ids:  # a state made after tokens (never, today)
                self._grammar_state.accept(token)
        return self._grammar_state

    def generator(self, device: torch.device) -> torch.Generator:
        """This request's own generator on `device`: seeded from `sampling.seed`, or randomly."""
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            if self.sampling.seed is None:
                self._generator.seed()
            else:
                self._generator.manual_seed(self.sampling.seed)
        return self._generator

    @property
    def prefix_len(self) -> int:
        return 0 if self.prefix is None else self.prefix.num_virtual_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_ids(self, start: int, count: int) -> list[int]:
        """The request's own tokens start..start+count-1: prompt, then output."""
        prompt_len = len(self.prompt_token_ids)
        if start + count <= prompt_len:
            return self.prompt_token_ids[start : start + count]
        tokens = self.prompt_token_ids[start:] + self.output_token_ids[max(0, start - prompt_len) :]
        return tokens[:count]

    @property
    def num_pending(self) -> int:
        """Tokens to feed before the next sample: the (rest of the) prompt, or the last output
        token in decode; after a preemption, everything again."""
        return self.num_tokens - self.num_cached

    @property
    def pending_token_ids(self) -> list[int]:
        return self.token_ids(self.num_cached, self.num_pending)

    @property
    def next_position(self) -> int:
        return self.prefix_len + self.num_cached

    @property
    def records_logprobs(self) -> bool:
        """Each chosen token's log-probability is kept (asked for, or an ensemble's vote)."""
        return self.vote_logprobs or self.sampling.logprobs is not None

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.sampling.prompt_logprobs is not None

    @property
    def lockstep_group(self) -> RequestGroup | None:
        return self.group if self.group is not None and self.group.lockstep else None

    @property
    def rows(self) -> list[Request]:
        """The rows admitted, preempted and cancelled with this one: all of its group's while
        the group waits for admission or for its prompt (`shares_prompt`), and ever after for a
        lockstep group; else itself."""
        group = self.group
        if group is not None and (group.lockstep or not group.admitted or group.waits_for_fork):
            return list(group.members)
        return [self]

    @property
    def finished(self) -> bool:
        """Its outcome is decided (it may still hold blocks until the step retires it)."""
        return self.finish_reason is not None

    def finish(self, reason: str, error: RequestFailed | None = None) -> None:
        """The one place a request's outcome is written; the first decision stands, except that
        a stop string found in the text of the token that reached the length limit is a stop."""
        if self.finish_reason is None or (reason == "stop" and self.finish_reason == "length"):
            self.finish_reason, self.error = reason, error
