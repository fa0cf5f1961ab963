"""OpenAI-compatible endpoints: /v1/completions, /v1/chat/completions, /v1/models.

`model` is a prefix or stored ensemble reference (`owner/name`, or an own `name`) or the base
model's id.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool

from server.api.auth import Server, Tenant
from server.api.errors import ApiError
from server.api.generation import (
    Job,
    chat_prompt,
    respond,
    sampling_params,
    tokenize,
    with_stored_ensemble,
)
from server.api.query import reject_unknown_query
from server.api.schemas import (
    ERROR_RESPONSES,
    STREAM_RESPONSE,
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIBase,
)
from server.api.services import Ready
from server.engine.stream import Chunk, RequestStream, Result

router = APIRouter(responses=ERROR_RESPONSES, dependencies=[Depends(reject_unknown_query)])
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


def openai_usage(results: list[tuple[int, int]]) -> dict[str, int]:
    """From (prompt tokens, completion tokens) per choice."""
    prompt_tokens = sum(p for p, _ in results)
    completion = sum(n for _, n in results)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }


def response_meta(prefix: str, model: str) -> dict[str, Any]:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}


@router.post("/v1/completions", responses=STREAM_RESPONSE)
async def completions(
    body: CompletionRequest, http_request: Request, server: Server, tenant: Tenant
) -> Any:
    check_supported(body)
    prompts = await prompts_of(server, body.prompt)
    sampling = sampling_params(server, body, max_new_tokens=body.max_tokens or DEFAULT_MAX_TOKENS)
    job = Job(prompts, prefix_of(server, body.model), sampling, body.stream)
    job = await with_stored_ensemble(server, tenant, job)
    encoder = CompletionEncoder(response_meta("cmpl", body.model))
    return await respond(server, tenant, job, encoder, http_request)


class CompletionEncoder:
    def __init__(self, meta: dict[str, Any]) -> None:
        self.meta = {**meta, "object": "text_completion"}

    def result(self, results: list[Result]) -> dict[str, Any]:
        return {
            **self.meta,
            "choices": [
                {"index": i, "text": r.text, "finish_reason": r.finish_reason, "logprobs": None}
                for i, r in enumerate(results)
            ],
            "usage": openai_usage([(r.prompt_tokens, len(r.token_ids)) for r in results]),
        }

    def opening(self) -> list[dict[str, Any]]:
        return []

    def chunk(self, chunk: Chunk, stream: RequestStream) -> dict[str, Any]:
        choice = {"index": 0, "text": chunk.text, "finish_reason": chunk.finish_reason}
        return {**self.meta, "choices": [{**choice, "logprobs": None}]}


@router.post("/v1/chat/completions", responses=STREAM_RESPONSE)
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
    job = Job([prompt], prefix_of(server, body.model), sampling, body.stream)
    job = await with_stored_ensemble(server, tenant, job)
    encoder = ChatEncoder(response_meta("chatcmpl", body.model))
    return await respond(server, tenant, job, encoder, http_request)


class ChatEncoder:
    def __init__(self, meta: dict[str, Any]) -> None:
        self.meta = meta

    def result(self, results: list[Result]) -> dict[str, Any]:
        (result,) = results
        message = {"role": "assistant", "content": result.text}
        return {
            **self.meta,
            "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "finish_reason": result.finish_reason}],
            "usage": openai_usage([(result.prompt_tokens, len(result.token_ids))]),
        }

    def opening(self) -> list[dict[str, Any]]:
        delta = {"role": "assistant", "content": ""}
        return [self._event({"index": 0, "delta": delta, "finish_reason": None})]

    def chunk(self, chunk: Chunk, stream: RequestStream) -> dict[str, Any]:
        delta = {"content": chunk.text} if chunk.text else {}
        return self._event({"index": 0, "delta": delta, "finish_reason": chunk.finish_reason})

    def _event(self, choice: dict[str, Any]) -> dict[str, Any]:
        return {**self.meta, "object": "chat.completion.chunk", "choices": [choice]}


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
            break
    stored = await run_in_threadpool(server.ensembles.visible, tenant=tenant)
    data += [
        {
            "id": info.id,
            "object": "model",
            "created": int(info.created_at.timestamp()),
            "owned_by": info.owner,
        }
        for info in stored
    ]
    return {"object": "list", "data": data}
