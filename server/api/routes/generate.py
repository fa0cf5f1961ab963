"""POST /v1/generate: the native generation endpoint (token ids in the response)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from server.api.auth import Server, Tenant
from server.api.generation import (
    SSE_HEADERS,
    collect,
    failure_event,
    sampling_params,
    sse,
    start,
    tokenize,
)
from server.api.schemas import GenerateRequest, GenerateResponse, Usage
from server.engine.stream import RequestFailed, RequestStream

router = APIRouter()


@router.post("/v1/generate", response_model=GenerateResponse)
async def generate(
    body: GenerateRequest, http_request: Request, server: Server, tenant: Tenant
) -> GenerateResponse | StreamingResponse:
    prompt = await tokenize(server, body.prompt)
    sampling = sampling_params(
        server, body, max_new_tokens=body.max_new_tokens, ignore_eos=body.ignore_eos
    )
    stream = await start(server, tenant, prompt, body.prefix, sampling, stream=body.stream)
    if body.stream:
        return StreamingResponse(
            events(stream), media_type="text/event-stream", headers=SSE_HEADERS
        )
    result = await collect(stream, http_request)
    return GenerateResponse(
        text=result.text,
        token_ids=result.token_ids,
        finish_reason=result.finish_reason,
        usage=usage(stream, len(result.token_ids)),
    )


def usage(stream: RequestStream, completion_tokens: int) -> Usage:
    prompt_tokens = len(stream.request.prompt_token_ids)
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        prefix_tokens=stream.request.prefix_len,
        total_tokens=prompt_tokens + completion_tokens,
    )


async def events(stream: RequestStream) -> AsyncIterator[str]:
    generated = 0
    try:
        async for chunk in stream:
            generated += len(chunk.token_ids)
            event: dict[str, Any] = {
                "text": chunk.text,
                "token_ids": chunk.token_ids,
                "finish_reason": chunk.finish_reason,
            }
            if chunk.finish_reason is not None:
                event["usage"] = usage(stream, generated).model_dump()
            yield sse(event)
    except RequestFailed as exc:
        yield sse(failure_event(exc))
    yield sse("[DONE]")
