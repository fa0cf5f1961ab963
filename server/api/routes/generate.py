"""POST /v1/generate: the native generation endpoint (token ids in the response)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from server.api.auth import Server, Tenant
from server.api.generation import Job, respond, sampling_params, tokenize
from server.api.query import reject_unknown_query
from server.api.schemas import (
    ERROR_RESPONSES,
    STREAM_RESPONSE,
    GenerateRequest,
    GenerateResponse,
    Usage,
)
from server.engine.stream import Chunk, RequestStream, Result

router = APIRouter(responses=ERROR_RESPONSES, dependencies=[Depends(reject_unknown_query)])


@router.post("/v1/generate", response_model=GenerateResponse, responses=STREAM_RESPONSE)
async def generate(
    body: GenerateRequest, http_request: Request, server: Server, tenant: Tenant
) -> GenerateResponse | StreamingResponse:
    sampling = sampling_params(
        server, body, max_new_tokens=body.max_new_tokens, ignore_eos=body.ignore_eos
    )
    job = Job([await tokenize(server, body.prompt)], body.prefix, sampling, body.stream)
    response: GenerateResponse | StreamingResponse = await respond(
        server, tenant, job, NativeEncoder(), http_request
    )
    return response


def usage(prompt_tokens: int, prefix_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        prefix_tokens=prefix_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


class NativeEncoder:
    def __init__(self) -> None:
        self.generated = 0

    def result(self, results: list[Result]) -> GenerateResponse:
        (result,) = results
        return GenerateResponse(
            text=result.text,
            token_ids=result.token_ids,
            finish_reason=result.finish_reason,
            usage=usage(result.prompt_tokens, result.prefix_tokens, len(result.token_ids)),
        )

    def opening(self) -> list[dict[str, Any]]:
        return []

    def chunk(self, chunk: Chunk, stream: RequestStream) -> dict[str, Any]:
        self.generated += len(chunk.token_ids)
        event: dict[str, Any] = {
            "text": chunk.text,
            "token_ids": chunk.token_ids,
            "finish_reason": chunk.finish_reason,
        }
        if chunk.finish_reason is not None:
            counts = (stream.prompt_tokens, stream.prefix_tokens, self.generated)
            event["usage"] = usage(*counts).model_dump()
        return event
