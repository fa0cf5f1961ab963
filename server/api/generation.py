"""The one generation pipeline every protocol shares: prompts -> pinned prefix -> engine ->
a JSON body or one SSE stream. A protocol (native, completions, chat) only decodes its request
into a `Job` and encodes results and chunks through its `Encoder`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Any, Protocol

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from prefixes import CompiledPrefix
from prefixes.catalog.ensembles import EnsembleMethod
from prefixes.catalog.names import parse_ref
from prefixes.catalog.records import PrefixInfo
from prefixes.errors import InvalidName, NotFound, PoolExhausted
from prefixes.usage.records import Failure
from server.api.errors import ApiError, error_body, to_api_error
from server.api.rate_limit_headers import rate_limited, show_rate_limits
from server.api.rate_limits import RateLimited, TooLarge
from server.api.schemas import SamplingFields
from server.api.services import Ready
from server.api.usage import CallUsage
from server.api.voting import Candidate, mean_logprob, tally, voted_result
from server.engine.engine import EngineStopped
from server.engine.gate import Overloaded
from server.engine.grammar import Grammar
from server.engine.request import SamplingParams
from server.engine.stream import Chunk, RequestFailed, RequestStream, Result

Release = Callable[[], None]
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(frozen=True)
class Ensemble:
    """A prompt ensemble: each prompt runs under every member prefix, combined by `method`."""

    members: tuple[str, ...]  # prefix references
    method: EnsembleMethod
    stored: str | None = None  # the stored ensemble's id, when the request named one


@dataclass(frozen=True)
class Job:
    """What a protocol asks for: one request per prompt, all with the same prefix (or the same
    ensemble) and sampling."""

    prompts: list[list[int]]
    prefix: str | None  # a prefix or stored ensemble reference; None: the base model
    sampling: SamplingParams
    stream: bool
    ensemble: Ensemble | None = None  # set instead of `prefix`
    choices: int = 1  # n: rows per prompt, prefilled once (RequestGroup.shares_prompt)


class Encoder(Protocol):
    """A protocol's response shapes. One encoder per HTTP request, so it may keep state.
    A streamed choice's `index` is its place among the request's streams."""

    def result(self, results: list[Result]) -> Any: ...

    def opening(self, choices: int) -> list[dict[str, Any]]: ...

    def chunk(self, chunk: Chunk, stream: RequestStream, index: int) -> dict[str, Any]: ...

    def closing(self, streams: list[RequestStream]) -> list[dict[str, Any]]: ...


async def respond(
    server: Ready, tenant: str, job: Job, encoder: Encoder, http_request: Request
) -> Any:
    """Run a job whose prefix reference is resolved already (`with_stored_ensemble`)."""
    if job.stream and len(job.prompts) > 1:
        raise ApiError(400, "invalid_request", "prompt: streaming takes one prompt", field="prompt")
    if job.ensemble is not None:
        check_ensemble_job(job)
    else:
        check_queue_room(server, len(job.prompts), job.choices, "n")
    voting = job.ensemble is not None and job.ensemble.method is EnsembleMethod.VOTE
    if voting and job.stream:
        raise ApiError(
            400,
            "invalid_request",
            "stream: a vote's answer exists only once every member has finished; "
            "stream with ensemble 'mean', or ask without stream",
            field="stream",
        )
    if job.ensemble is not None:
        check_queue_room(server, len(job.prompts), len(job.ensemble.members), "prompt")
    usage = admit_tokens(server, tenant, job, http_request)
    started = await start_all(server, tenant, job, usage)
    if job.ensemble is not None:
        server.ensemble_metrics.started(
            job.ensemble.method, len(job.ensemble.members), len(job.prompts)
        )
    if voting:
        assert job.ensemble is not None
        return encoder.result(await collect_votes(server, job.ensemble, started, http_request))
    streams = [stream for streams in started for stream in streams]
    if job.stream:
        events = sse_events(streams, encoder)
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
    return encoder.result(await collect_all(streams, http_request))


def check_queue_room(server: Ready, prompts: int, rows: int, field: str) -> None:
    """Each prompt queues `rows` rows (an ensemble's members, or n choices), all before the
    answer: more rows than the tenant may queue could never all be accepted, and a 429 would
    invite retries that can never succeed (the engine refuses one group over the limit the
    same way). `field` is what the message names."""
    limit = server.engine.gate.tenant_queue_limit
    if prompts == 1 or prompts * rows <= limit:
        return
    if field == "n":
        message = (
            f"n: expected at most {limit // prompts} choices for {prompts} prompts (each "
            f"choice queues a row; a tenant may queue {limit}), found {rows}"
        )
    else:
        message = (
            f"prompt: expected at most {limit // rows} prompts for an ensemble of {rows} "
            f"members (each prompt queues a row per member; a tenant may queue {limit}), "
            f"found {prompts}"
        )
    raise ApiError(400, "invalid_request", message, field=field)


def check_ensemble_job(job: Job) -> None:
    """What an ensemble cannot answer: several choices, and the prompt's log-probs (each
    member scores the prompt under its own prefix; no single distribution is the
    ensemble's there)."""
    if job.choices > 1:
        raise ApiError(
            400,
            "invalid_request",
            "n: an ensemble answers one choice per prompt; ask for n = 1",
            field="n",
        )
    if job.sampling.prompt_logprobs is not None:
        raise ApiError(
            400,
            "invalid_request",
            "prompt_logprobs: an ensemble does not score prompts (each member reads the "
            "prompt under its own prefix); score each member's prefix on its own",
            field="prompt_logprobs",
        )


async def with_stored_ensemble(server: Ready, tenant: str, job: Job) -> Job:
    """The job with its prefix reference read as a stored ensemble, when it names one the
    tenant may see (ensembles and prefixes share names); unchanged otherwise."""
    if job.prefix is None or job.ensemble is not None:
        return job
    try:
        found = await run_in_threadpool(server.ensembles.find, job.prefix, tenant=tenant)
    except InvalidName:
        return job  # not a reference at all: the prefix lookup says so
    if found is None:
        return job
    ensemble = Ensemble(found.members, found.method, stored=found.id)
    return replace(job, prefix=None, ensemble=ensemble)


# Decoding ------------------------------------------------------------------------------------


async def tokenize(server: Ready, prompt: str | list[int]) -> list[int]:
    """Token ids of a prompt; text is tokenized on a worker thread, never on the event loop."""
    if isinstance(prompt, list):
        return prompt
    tokenizer = server.loaded.tokenizer
    if tokenizer is None:
        raise ApiError(
            400,
            "invalid_request",
            "prompt: this model has no tokenizer; send token ids",
            field="prompt",
        )
    try:
        ids = await run_in_threadpool(tokenizer.encode, prompt)  # type: ignore[attr-defined]
    except Exception as exc:  # text the tokenizer cannot take, e.g. a lone surrogate
        raise ApiError(
            400, "invalid_request", f"prompt: cannot be tokenized ({exc})", field="prompt"
        ) from None
    return list(ids)


async def chat_prompt(server: Ready, messages: list[dict[str, Any]]) -> list[int]:
    """Token ids of a conversation through the model's chat template, on a worker thread."""
    tokenizer = server.loaded.tokenizer
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ApiError(
            400, "invalid_request", "messages: this model has no chat template", field="messages"
        )
    try:
        ids = await run_in_threadpool(
            tokenizer.apply_chat_template,  # type: ignore[attr-defined]
            messages,
            add_generation_prompt=True,
            tokenize=True,
        )
    except Exception as exc:  # a template can reject a conversation (roles, order, text)
        raise ApiError(400, "invalid_request", f"messages: {exc}", field="messages") from None
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def sampling_params(
    server: Ready,
    fields: SamplingFields,
    *,
    max_new_tokens: int,
    ignore_eos: bool = False,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
    grammar: Grammar | None = None,
) -> SamplingParams:
    """The schema bounds every field; what depends on this server and model is checked here.
    `grammar`: the request's compiled constraint (constraints.py)."""
    limit = server.settings.max_new_tokens_limit
    if max_new_tokens > limit:
        raise ApiError(
            400,
            "invalid_request",
            f"max_new_tokens: expected at most {limit}, found {max_new_tokens}",
        )
    vocab = server.loaded.spec.vocab_size
    defaults = server.loaded.generation_defaults
    temperature = first_set(fields.temperature, defaults.get("temperature"), 1.0)
    top_p = first_set(fields.top_p, defaults.get("top_p"), 1.0)
    top_k = int(first_set(fields.top_k, defaults.get("top_k"), 0))
    repetition_penalty = first_set(
        fields.repetition_penalty, defaults.get("repetition_penalty"), 1.0
    )
    if top_k > vocab:
        raise ApiError(
            422,
            "invalid_request",
            f"top_k: expected at most the vocabulary size {vocab}, found {top_k}",
            field="top_k",
        )
    if fields.min_tokens > max_new_tokens:
        raise ApiError(
            400,
            "invalid_request",
            f"min_tokens: expected at most the tokens asked for ({max_new_tokens}), "
            f"found {fields.min_tokens}",
            field="min_tokens",
        )
    bias = tuple((int(token), value) for token, value in (fields.logit_bias or {}).items())
    outside = [token for token, _ in bias if token >= vocab]
    if outside:
        raise ApiError(
            400,
            "invalid_request",
            f"logit_bias: expected token ids in [0, {vocab}), found {outside[0]}",
            field="logit_bias",
        )
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=fields.seed,
        stop=tuple(fields.stop or ()),
        ignore_eos=ignore_eos,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        logit_bias=bias,
        min_tokens=fields.min_tokens,
        repetition_penalty=repetition_penalty,
        frequency_penalty=fields.frequency_penalty,
        presence_penalty=fields.presence_penalty,
        grammar=grammar,
    )


def first_set(*values: float | None) -> float:
    """The first value that is not None (the request's, the model's default, OpenAI's)."""
    return next(value for value in values if value is not None)


def check_choices(server: Ready, n: int) -> int:
    """`n` within the server's limit and what one tenant may run at once."""
    most = server.settings.rows_per_request
    if n > most:
        raise ApiError(
            400,
            "invalid_request",
            f"n: expected at most {most} (choices decoded together), found {n}",
            field="n",
        )
    return n


# Running -------------------------------------------------------------------------------------


async def pin(
    server: Ready, tenant: str, prefix_ref: str, alongside: list[PrefixInfo] | None = None
) -> tuple[CompiledPrefix, Release]:
    """Pin the prefix's current version for one row; the engine calls the release.
    `alongside`: the versions the same request pinned already (an ensemble's earlier members),
    to which the one pinned here is added."""
    held: list[PrefixInfo] = []  # the tenant's budget counts a version before it is pinned

    def before_pin(info: PrefixInfo) -> None:
        server.pins.hold(tenant, info, alongside or ())
        held.append(info)

    try:
        handle = await run_in_threadpool(
            server.registry.acquire, prefix_ref, tenant=tenant, before_pin=before_pin
        )
    except BaseException:
        for info in held:
            server.pins.forget(tenant, info)
        raise
    for replaced in held[:-1]:  # resolved again after a concurrent delete: only the last holds
        server.pins.forget(tenant, replaced)
    if alongside is not None:
        alongside.append(held[-1])

    def release() -> None:
        handle.release()
        server.pins.forget(tenant, held[-1])

    return handle.prefix, release


async def pin_members(
    server: Ready, tenant: str, ensemble: Ensemble
) -> list[tuple[CompiledPrefix | None, Release | None]]:
    """Pin every member, resolved and authorised like a single prefix; all or none."""
    pinned: list[tuple[CompiledPrefix | None, Release | None]] = []
    versions: list[PrefixInfo] = []  # one request: its members count together (pins.py)
    try:
        for ref in ensemble.members:
            try:
                pinned.append(await pin(server, tenant, ref, versions))
            except NotFound:
                if ensemble.stored is None:
                    raise
                raise NotFound(
                    f"ensemble {ensemble.stored}: member {ref} not found (deleted, or not "
                    "visible to this tenant)",
                    field="model",
                ) from None
    except BaseException:
        for _, release in pinned:
            if release is not None:
                release()
        raise
    return pinned


async def start(
    server: Ready, tenant: str, prompt: list[int], job: Job, usage: CallUsage
) -> list[RequestStream]:
    """Queue the prompt's request (or its ensemble's rows, admitted together); the engine
    releases the pins. A vote gives one stream per member, anything else one stream.

    Text is decoded every step only for streams; otherwise once, at the end."""
    if job.ensemble is not None:
        members = await pin_members(server, tenant, job.ensemble)
        return server.engine.submit_group(
            prompt,
            job.sampling,
            members,
            lockstep=job.ensemble.method is EnsembleMethod.MEAN,
            tenant=tenant,
            stream_text=job.stream,
            on_finish=usage.on_finish,
        )
    member: tuple[CompiledPrefix | None, Release | None] = (None, None)
    if job.prefix is not None:  # "" is a reference too (an invalid one), not the base model
        member = await pin(server, tenant, job.prefix)
    return server.engine.submit_group(
        prompt,
        job.sampling,
        [member],
        tenant=tenant,
        stream_text=job.stream,
        choices=job.choices,
        on_finish=usage.on_finish,
    )


async def start_all(
    server: Ready, tenant: str, job: Job, usage: CallUsage
) -> list[list[RequestStream]]:
    """Each prompt's streams, all or none: if one is refused, those started are cancelled
    (and counted as such when they leave the engine)."""
    started: list[list[RequestStream]] = []
    try:
        for prompt in job.prompts:
            started.append(await start(server, tenant, prompt, job, usage))
    except BaseException as exc:
        for streams in started:
            for stream in streams:
                stream.cancel()
        usage.refused(failure_of(exc))
        usage.started(len(started) * rows_per_prompt(job))
        raise
    usage.started(len(started) * rows_per_prompt(job))
    return started


# Usage and rate limits -----------------------------------------------------------------------


def rows_per_prompt(job: Job) -> int:
    return len(job.ensemble.members) if job.ensemble is not None else job.choices


def usage_models(server: Ready, tenant: str, job: Job) -> tuple[str, ...]:
    """What the call's rows count under: the stored ensemble, each member of an unnamed one,
    the prefix, or the base model; references as `owner/name`."""
    if job.ensemble is not None and job.ensemble.stored is not None:
        return (job.ensemble.stored,)
    refs = job.ensemble.members if job.ensemble is not None else (job.prefix,)
    if refs == (None,):
        return (server.loaded.model_id,)
    return tuple("/".join(parse_ref(ref, tenant)) for ref in refs if ref is not None)


def admit_tokens(server: Ready, tenant: str, job: Job, http_request: Request) -> CallUsage:
    """Reserve the call's tokens (its prompts, and max tokens for every row), or refuse it
    with 429 before anything is queued; the reservation is settled when its rows have left."""
    try:
        models = usage_models(server, tenant, job)
    except InvalidName:
        models = ("",)  # never counted: the prefix lookup refuses the call
    rows = len(job.prompts) * rows_per_prompt(job)
    reserved = sum(map(len, job.prompts)) + job.sampling.max_new_tokens * rows
    usage = CallUsage(server.usage_meter, server.rate_limiter, tenant, models, reserved)
    try:
        reserve(usage, http_request)
    except TooLarge as exc:
        raise ApiError(400, "invalid_request", f"max_tokens: {exc}", field="max_tokens") from None
    return usage


def reserve(usage: CallUsage, http_request: Request) -> None:
    """Reserve the call's tokens and show the figures in the response's headers, or refuse it
    with 429 (counted) before anything is queued; TooLarge (counted) for the caller to word:
    the call could never fit, whatever it waits."""
    try:
        snapshot = usage.limiter.reserve_tokens(usage.tenant, usage.reserved)
    except RateLimited as exc:
        usage.refused(Failure.RATE_LIMITED)
        raise rate_limited(http_request, exc) from None
    except TooLarge:
        usage.refused(Failure.INVALID)
        raise
    show_rate_limits(http_request, snapshot)


def failure_of(exc: BaseException) -> Failure:
    if isinstance(exc, Overloaded | PoolExhausted) or (
        isinstance(exc, ApiError) and exc.status == 429
    ):
        return Failure.OVERLOADED
    if isinstance(exc, EngineStopped):
        return Failure.ERROR
    if isinstance(exc, asyncio.CancelledError):
        return Failure.CANCELLED
    return Failure.INVALID


async def collect_votes(
    server: Ready, ensemble: Ensemble, started: list[list[RequestStream]], http_request: Request
) -> list[Result]:
    """Every member's answer to every prompt, then each prompt's vote."""
    everything = [stream for streams in started for stream in streams]
    results = iter(await collect_all(everything, http_request))
    voted: list[Result] = []
    for streams in started:
        candidates = [
            Candidate(ref, next(results), mean_logprob(stream.request.output_logprobs))
            for ref, stream in zip(ensemble.members, streams, strict=True)
        ]
        vote = tally(candidates, by_text=server.loaded.tokenizer is not None)
        server.ensemble_metrics.vote_agreement.observe(vote.agreement)
        voted.append(voted_result(vote))
    return voted


async def collect(stream: RequestStream, http_request: Request) -> Result:
    """Wait for the whole result; a client that disconnects meanwhile cancels the request."""
    task = asyncio.ensure_future(stream.result())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await http_request.is_disconnected():
                stream.cancel()
    finally:
        if not task.done():
            stream.cancel()
            task.cancel()


async def collect_all(streams: list[RequestStream], http_request: Request) -> list[Result]:
    try:
        return list(await asyncio.gather(*(collect(s, http_request) for s in streams)))
    finally:
        for stream in streams:
            stream.cancel()  # no-op for finished ones; stops the rest if one failed


# Streaming -----------------------------------------------------------------------------------


async def sse_events(streams: list[RequestStream], encoder: Encoder) -> AsyncIterator[str]:
    """The one SSE writer: the protocol's events (the choices' chunks as they come), a failure
    as an error event, then [DONE]."""
    for event in encoder.opening(len(streams)):
        yield sse(event)
    try:
        async with aclosing(interleaved(streams)) as chunks:
            async for index, chunk in chunks:
                yield sse(encoder.chunk(chunk, streams[index], index))
        for event in encoder.closing(streams):
            yield sse(event)
    except RequestFailed as exc:
        error = to_api_error(exc)
        yield sse(error_body(error.type, error.message))
    yield sse("[DONE]")


async def interleaved(streams: list[RequestStream]) -> AsyncGenerator[tuple[int, Chunk]]:
    """Every stream's chunks, each as soon as it comes, with its stream's index; the first
    failure ends it (the others are then cancelled by the caller's cleanup)."""
    if len(streams) == 1:
        async for chunk in streams[0]:
            yield 0, chunk
        return
    queue: asyncio.Queue[tuple[int, Chunk | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: RequestStream) -> None:
        try:
            async for chunk in stream:
                queue.put_nowait((index, chunk))
        except BaseException as exc:  # handed to the reader, which raises it
            queue.put_nowait((index, exc))
            return
        queue.put_nowait((index, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(streams)
        while running:
            index, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.cancel()


def sse(data: dict[str, Any] | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n"
