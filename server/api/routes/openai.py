"""OpenAI-compatible endpoints: /v1/completions, /v1/chat/completions, /v1/models.

`model` is a prefix reference (`owner/name`, or an own `name`) or the base model's id.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from server.api.auth import Server, Tenant
from server.api.errors import ApiError
from server.api.generation import (
    SSE_HEADERS,
    chat_prompt,
    collect,
    failure_event,
    sampling_params,
    sse,
    start,
    tokenize,
)
from server.api.schemas import ChatCompletionRequest, CompletionRequest, OpenAIBase
from server.api.services import Ready
from server.engine.request import SamplingParams
from server.engine.stream import RequestFailed, RequestStream, Result

router = APIRouter()
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


# Fields OpenAI clients send that change nothing in the output: accepted and ignored. Any other
# field this server does not implement is refused, never silently ignored.
IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier"})


def check_supported(body: OpenAIBase) -> None:
    for field in sorted(set(body.model_extra or {}) - IGNORED_FIELDS):
        raise ApiError(
            400, "invalid_request", f"{field}: not supported by this server", field=field
        )
    unsupported = {
        "n": body.n != 1,
        "logprobs": body.logprobs not in (None, False, 0),
        "presence_penalty": body.presence_penalty != 0,
        "frequency_penalty": body.frequency_penalty != 0,
        "echo": bool(getattr(body, "echo", False)),
        "best_of": getattr(body, "best_of", None) not in (None, 1),
    }
    for field, refused in unsupported.items():
        if refused:
            raise ApiError(
                400, "invalid_request", f"{field}: not supported by this server", field=field
            )


def prefix_of(server: Ready, model: str) -> str | None:
    return None if model == server.loaded.model_id else model


async def prompts_of(server: Ready, prompt: Any) -> list[list[int]]:
    if isinstance(prompt, str):
        return [await tokenize(server, prompt)]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [prompt]
    if not prompt:
        raise ApiError(400, "invalid_request", "prompt: expected a non-empty prompt")
    limit = server.settings.max_prompts_per_call
    if len(prompt) > limit:
        raise ApiError(
            422,
            "invalid_request",
            f"prompt: expected at most {limit} prompts per call, found {len(prompt)}",
            field="prompt",
        )
    return [await tokenize(server, p) for p in prompt]


def openai_usage(results: list[tuple[RequestStream, int]]) -> dict[str, int]:
    prompt_tokens = sum(len(s.request.prompt_token_ids) for s, _ in results)
    completion = sum(n for _, n in results)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }


@router.post("/v1/completions")
async def completions(
    body: CompletionRequest, http_request: Request, server: Server, tenant: Tenant
) -> Any:
    check_supported(body)
    prompts = await prompts_of(server, body.prompt)
    if body.stream and len(prompts) > 1:
        raise ApiError(400, "invalid_request", "prompt: streaming takes one prompt")
    sampling = sampling_params(server, body, max_new_tokens=body.max_tokens or DEFAULT_MAX_TOKENS)
    prefix = prefix_of(server, body.model)
    streams = await start_all(server, tenant, prompts, prefix, sampling, stream=body.stream)
    meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
    if body.stream:
        return StreamingResponse(
            completion_events(streams[0], meta), media_type="text/event-stream", headers=SSE_HEADERS
        )
    results = await collect_all(streams, http_request)
    return {
        **meta,
        "object": "text_completion",
        "choices": [
            {"index": i, "text": r.text, "finish_reason": r.finish_reason, "logprobs": None}
            for i, r in enumerate(results)
        ],
        "usage": openai_usage(
            [(s, len(r.token_ids)) for s, r in zip(streams, results, strict=True)]
        ),
    }


async def start_all(
    server: Ready,
    tenant: str,
    prompts: list[list[int]],
    prefix: str | None,
    sampling: SamplingParams,
    *,
    stream: bool,
) -> list[RequestStream]:
    """Start one request per prompt, all or none: if one is refused, those started are cancelled."""
    streams: list[RequestStream] = []
    try:
        for prompt in prompts:
            streams.append(await start(server, tenant, prompt, prefix, sampling, stream=stream))
    except BaseException:
        for started in streams:
            started.cancel()
        raise
    return streams


async def collect_all(streams: list[RequestStream], http_request: Request) -> list[Result]:
    try:
        return list(await asyncio.gather(*(collect(s, http_request) for s in streams)))
    finally:
        for stream in streams:
            stream.cancel()  # no-op for finished ones; stops the rest if one failed


async def completion_events(stream: RequestStream, meta: dict[str, Any]) -> AsyncIterator[str]:
    base = {**meta, "object": "text_completion"}
    try:
        async for chunk in stream:
            choice = {"index": 0, "text": chunk.text, "finish_reason": chunk.finish_reason}
            yield sse({**base, "choices": [{**choice, "logprobs": None}]})
    except RequestFailed as exc:
        yield sse(failure_event(exc))
    yield sse("[DONE]")


@router.post("/v1/chat/completions")
async def chat_completions(
    body: ChatCompletionRequest, http_request: Request, server: Server, tenant: Tenant
) -> Any:
    check_supported(body)
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    prompt = await chat_prompt(server, messages)
    max_tokens = (
        body.max_completion_tokens or body.max_tokens or server.settings.max_new_tokens_limit
    )
    sampling = sampling_params(server, body, max_new_tokens=max_tokens)
    prefix = prefix_of(server, body.model)
    stream = await start(server, tenant, prompt, prefix, sampling, stream=body.stream)
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
    if body.stream:
        return StreamingResponse(
            chat_events(stream, meta), media_type="text/event-stream", headers=SSE_HEADERS
        )
    result = await collect(stream, http_request)
    return {
        **meta,
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "finish_reason": result.finish_reason,
            }
        ],
        "usage": openai_usage([(stream, len(result.token_ids))]),
    }


async def chat_events(stream: RequestStream, meta: dict[str, Any]) -> AsyncIterator[str]:
    base = {**meta, "object": "chat.completion.chunk"}
    first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
    yield sse({**base, "choices": [first]})
    try:
        async for chunk in stream:
            delta = {"content": chunk.text} if chunk.text else {}
            choice = {"index": 0, "delta": delta, "finish_reason": chunk.finish_reason}
            yield sse({**base, "choices": [choice]})
    except RequestFailed as exc:
        yield sse(failure_event(exc))
    yield sse("[DONE]")


@router.get("/v1/models")
async def models(server: Server, tenant: Tenant) -> dict[str, Any]:
    created = int(time.time())
    data = [
        {"id": server.loaded.model_id, "object": "model", "created": created, "owned_by": "system"}
    ]
    cursor = None
    while True:
        page = await run_in_threadpool(
            server.registry.list_prefixes, tenant=tenant, scope="all", limit=1000, cursor=cursor
        )
        data += [
            {
                "id": info.id,
                "object": "model",
                "created": int(info.created_at.timestamp()),
                "owned_by": info.owner,
            }
            for info in page.items
            if info.compatible
        ]
        cursor = page.next_cursor
        if cursor is None:
            return {"object": "list", "data": data}
