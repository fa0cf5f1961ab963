"""Scoring candidate prefixes on a training file as rows of the engine's mixed batches.

Every (candidate or base model, example) pair is one prompt-scoring request (`max_new_tokens`
0, `prompt_logprobs` 0: the path `echo` and lm-evaluation-harness use), queued like any other
request of the tenant, so it shares steps with everyone's rows and is held to the tenant's
caps: at most half the tenant's queue is taken at once (the other half stays for its own
requests), the engine runs at most `--max-running-per-tenant` of them, and a row the queue
refuses waits for one of the scoring's own rows to finish. Each candidate is pinned once for
the whole scoring; its rows share that pin (`SharedPin`).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from prefixes import CompiledPrefix
from prefixes.catalog.records import PrefixInfo
from prefixes.errors import NotFound
from prefixes.usage.records import Counts, Failure
from server.api.errors import ApiError
from server.api.generation import failure_of, pin, reserve
from server.api.rate_limits import TooLarge
from server.api.services import Ready
from server.api.usage import CallUsage
from server.engine.gate import Overloaded
from server.engine.request import NonFiniteOutput, SamplingParams
from server.engine.request import Request as EngineRequest
from server.engine.stream import RequestStream, Result
from server.train import Example
from server.tuning.data import parse_records, to_examples
from server.tuning.transferability import (
    LossSum,
    Scored,
    draw_sample,
    example_loss,
    target_positions,
)

SCORE_ONLY = SamplingParams(max_new_tokens=0, prompt_logprobs=0)
DISCONNECT_POLL = 0.25  # seconds between checks that the client still waits


@dataclass(frozen=True, slots=True)
class Query:
    training_file: str
    candidates: tuple[str, ...] | None  # None: the tenant's own and the public ones
    sample_size: int
    seed: int


@dataclass(frozen=True, slots=True)
class Ranking:
    lines: list[int]  # the sample: the file's line of each example scored
    target_tokens: int  # tokens each candidate's loss is the mean of
    base: Scored
    candidates: list[tuple[PrefixInfo, Scored]]  # as asked (or listed); the route ranks them
    truncated: bool  # default candidates: more were usable than the bound allows


class SharedPin:
    """One candidate's pin, held by the scoring and by each row submitted under it: released
    when the last lets go (a cancelled row leaves the engine after the scoring has ended)."""

    def __init__(self, release: Callable[[], None]) -> None:
        self._release = release
        self._holders = 1
        self._lock = threading.Lock()  # rows are released on the engine's thread

    def for_row(self) -> Callable[[], None]:
        with self._lock:
            self._holders += 1
        return self.drop

    def drop(self) -> None:
        with self._lock:
            self._holders -= 1
            last = self._holders == 0
        if last:
            self._release()


async def rank_candidates(
    server: Ready, tenant: str, query: Query, http_request: Request
) -> Ranking:
    try:
        content = await run_in_threadpool(server.tuning.file_content, tenant, query.training_file)
    except NotFound as exc:
        raise NotFound(f"training_file: {exc.message}", field="training_file") from None
    if server.loaded.tokenizer is None:
        raise ApiError(
            400, "invalid_request", "training_file: this model has no tokenizer",
            field="training_file",
        )  # fmt: skip
    records = draw_sample(
        await run_in_threadpool(parse_records, content, "training_file"),
        query.sample_size,
        query.seed,
    )
    if query.candidates is not None:
        refs, truncated = query.candidates, False
    else:
        refs, truncated = await run_in_threadpool(
            default_candidates, server, tenant, server.settings.max_transferability_candidates
        )
    infos: list[PrefixInfo] = []
    try:
        pins = await pin_candidates(server, tenant, refs, infos)
    except BaseException as exc:  # counted as a generation's refused pin is, under the model
        failure = failure_of(exc)
        server.usage_meter.add(tenant, server.loaded.model_id, Counts(**{failure.value: 1}))
        raise
    try:
        longest = max((info.num_virtual_tokens for info in infos), default=0)
        examples = await run_in_threadpool(
            to_examples,
            records,
            server.loaded.tokenizer,
            max_tokens=server.engine.core.max_len - 1 - longest,
        )
        if not any(target_positions(example) for example in examples):
            raise ApiError(
                400, "invalid_request", f"training_file: the {len(examples)} examples scored "
                "have no token to predict (their completions tokenize to nothing)",
                field="training_file",
            )  # fmt: skip
        prefixes: list[Prefix] = [None, *pins]
        models = (server.loaded.model_id, *(info.id for info in infos))
        usage = admit_tokens(server, tenant, models, examples, http_request)
        losses = await score(server, tenant, prefixes, models, examples, http_request, usage)
    finally:
        for _, shared in pins:
            shared.drop()
    base, *scored = [
        Scored(ref, loss.mean) if isinstance(loss, LossSum) else Scored(ref, None, loss)
        for ref, loss in zip([None, *(info.id for info in infos)], losses, strict=True)
    ]
    return Ranking(
        lines=[record.line for record in records],
        target_tokens=sum(len(target_positions(e)) for e in examples),
        base=base,
        candidates=list(zip(infos, scored, strict=True)),
        truncated=truncated,
    )


def default_candidates(server: Ready, tenant: str, bound: int) -> tuple[tuple[str, ...], bool]:
    """The tenant's own prefixes usable on the served model, then everyone else's public ones,
    each in `owner/name` order, at most `bound`; and whether more were usable."""
    found: list[str] = []
    for scope in ("own", "public"):
        cursor = None
        while True:
            page = server.registry.list_prefixes(
                tenant=tenant, scope=scope, limit=1000, cursor=cursor
            )
            for info in page.items:
                if info.compatible and (scope == "own" or info.owner != tenant):
                    if len(found) == bound:
                        return tuple(found), True
                    found.append(info.id)
            cursor = page.next_cursor
            if cursor is None:
                break
    return tuple(found), False


async def pin_candidates(
    server: Ready, tenant: str, refs: tuple[str, ...], infos: list[PrefixInfo]
) -> list[tuple[CompiledPrefix, SharedPin]]:
    """Pin every candidate, resolved and authorised like a request's prefix; all or none.
    `infos` receives each one's version, in order (and counts them as one request's pins)."""
    pinned: list[tuple[CompiledPrefix, SharedPin]] = []
    try:
        for ref in refs:
            try:
                prefix, release = await pin(server, tenant, ref, infos)
            except NotFound as exc:  # the same answer for a missing and a foreign prefix
                raise NotFound(f"candidates: {exc.message}", field="candidates") from None
            pinned.append((prefix, SharedPin(release)))
    except BaseException:
        for _, shared in pinned:
            shared.drop()
        raise
    return pinned


Prefix = tuple[CompiledPrefix, SharedPin] | None  # None: the base model
Outcome = LossSum | str  # a candidate's summed loss, or why it has none


def admit_tokens(
    server: Ready,
    tenant: str,
    models: tuple[str, ...],
    examples: list[Example],
    http_request: Request,
) -> CallUsage:
    """Reserve every row's prompt tokens against the tenant's tokens per minute, or refuse the
    scoring with 429 before any row is queued; each row counts in usage under its candidate
    (`models`, by the prefixes' order: the base model first)."""
    reserved = sum(len(example.input_ids) for example in examples) * len(models)
    usage = CallUsage(server.usage_meter, server.rate_limiter, tenant, models, reserved)
    try:
        reserve(usage, http_request)
    except TooLarge:
        _, limit = server.rate_limiter.limits(tenant)
        raise ApiError(
            400, "invalid_request",
            f"sample_size: scoring {plural(len(examples), 'example')} under "
            f"{plural(len(models) - 1, 'candidate')} and the base model reserves {reserved} "
            f"prompt tokens, more than tenant {tenant!r}'s {limit} tokens per minute"
            + (": ask for a smaller sample_size or fewer candidates" if limit else ""),
            field="sample_size",
        ) from None  # fmt: skip
    return usage


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


async def score(
    server: Ready,
    tenant: str,
    prefixes: list[Prefix],
    models: tuple[str, ...],
    examples: list[Example],
    http_request: Request,
    usage: CallUsage,
) -> list[Outcome]:
    """Each prefix's loss over the examples: every pair one row, at most a window in flight.
    Each row counts in `usage` under its prefix's entry of `models`."""
    rows = [(p, e) for e in range(len(examples)) for p in range(len(prefixes))]
    sums: list[Outcome] = [LossSum() for _ in prefixes]
    window = max(1, server.engine.gate.tenant_queue_limit // 2)
    running: dict[asyncio.Future[Result], tuple[int, int]] = {}
    streams: list[RequestStream] = []
    next_row = 0
    try:
        while next_row < len(rows) or running:
            while next_row < len(rows) and len(running) < window:
                p, e = rows[next_row]
                try:
                    stream = submit(
                        server, tenant, prefixes[p], examples[e], usage.on_finish_as(models[p])
                    )
                except Overloaded:
                    if not running:
                        usage.refused(Failure.OVERLOADED)
                        raise  # nothing of ours to wait for: 429, as for any request
                    break  # the tenant's queue is full: wait for one of ours to finish
                except BaseException as exc:  # the engine stopped, or refused the row
                    usage.refused(failure_of(exc))
                    raise
                streams.append(stream)
                running[asyncio.ensure_future(stream.result())] = rows[next_row]
                next_row += 1
            done, _ = await asyncio.wait(
                running, timeout=DISCONNECT_POLL, return_when=asyncio.FIRST_COMPLETED
            )
            if not done and await http_request.is_disconnected():
                raise ApiError(400, "invalid_request", "the client disconnected")  # unread
            for future in done:
                p, e = running.pop(future)
                sums[p] = add(sums[p], examples[e], future)
    finally:
        for future in running:
            future.cancel()
        for stream in streams:
            stream.cancel()  # no-op for finished rows
        usage.started(len(streams))  # the reservation is settled once they have all left
    return sums


def submit(
    server: Ready,
    tenant: str,
    prefix: Prefix,
    example: Example,
    on_finish: Callable[[EngineRequest], None],
) -> RequestStream:
    compiled, release = (None, None) if prefix is None else (prefix[0], prefix[1].for_row())
    return server.engine.submit(
        example.input_ids,
        SCORE_ONLY,
        prefix=compiled,
        release=release,
        tenant=tenant,
        stream_text=False,
        on_finish=on_finish,
    )


def add(outcome: Outcome, example: Example, future: asyncio.Future[Result]) -> Outcome:
    """A row's loss added to its prefix's; a prefix whose values overflow on an example has no
    loss (it fails alone: the other candidates keep theirs)."""
    try:
        result = future.result()
    except NonFiniteOutput:
        return "its values overflowed to NaN or Inf on these examples"
    if isinstance(outcome, str):
        return outcome
    if len(result.prompt_logprobs) < len(example.input_ids) - 1:  # cut short: not by us
        raise ApiError(503, "unavailable", "the server stopped before the scoring finished")
    return outcome + example_loss(example, [lp for lp, _ in result.prompt_logprobs])
