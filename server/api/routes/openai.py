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
from server.api.constraints import constraint_of
from server.api.errors import ApiError
from server.api.generation import (
    Job,
    chat_prompt,
    check_choices,
    respond,
    sampling_params,
    tokenize,
    with_stored_ensemble,
)
from server.api.logprob_shapes import (
    LegacyLogprobs,
    Scored,
    TokenText,
    chat_content,
    scored_output,
    scored_prompt,
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
from server.engine.logprobs import ChosenLogprobs
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
    if getattr(body, "best_of", None) not in (None, 1):
        raise ApiError(
            400,
            "invalid_request",
            "best_of: not supported by this server; ask for n choices and choose among them",
            field="best_of",
        )
    if body.stream_options is not None and not body.stream:
        raise ApiError(
            400,
            "invalid_request",
            "stream_options: only with stream set to true",
            field="stream_options",
        )


def prefix_of(server: Ready, model: str) -> str | None:
    return None if model == server.loaded.model_id else model


async def prompts_of(server: Ready, prompt: Any) -> list[list[int]]:
    if isinstance(prompt, str):
        return [await tokenize(server, prompt)]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [prompt]
    if not prompt:
        raise ApiError(
            400, "invalid_request", "prompt: expected a non-empty prompt", field="prompt"
        )
    limit = server.settings.max_prompts_per_call
    if len(prompt) > limit:
        raise ApiError(
            422,
            "invalid_request",
            f"prompt: expected at most {limit} prompts per call, found {len(prompt)}",
            field="prompt",
        )
    return [await tokenize(server, p) for p in prompt]


def openai_usage(results: list[tuple[int, int]], choices: int) -> dict[str, int]:
    """From (prompt tokens, completion tokens) per choice, `choices` per prompt: a prompt
    counts once however many choices answer it."""
    prompt_tokens = sum(p for p, _ in results[::choices])
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
    choices = check_choices(server, body.n)
    max_tokens = DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    if max_tokens == 0 and not body.echo:
        raise ApiError(
            400,
            "invalid_request",
            "max_tokens: 0 generates nothing; it only scores the prompt, with echo",
            field="max_tokens",
        )
    prompts = await prompts_of(server, body.prompt)
    # With echo the prompt's own log-probs come first; with max_tokens 0 they are all there is.
    prompt_logprobs = body.logprobs if body.echo else None
    if max_tokens == 0 and prompt_logprobs is None:
        prompt_logprobs = 0
    sampling = sampling_params(
        server,
        body,
        max_new_tokens=max_tokens,
        logprobs=body.logprobs,
        prompt_logprobs=prompt_logprobs,
        grammar=await constraint_of(server, body),
    )
    job = Job(prompts, prefix_of(server, body.model), sampling, body.stream, choices=choices)
    job = await with_stored_ensemble(server, tenant, job)
    prompt_texts = await prompt_texts_of(server, body.prompt, prompts) if body.echo else None
    encoder = CompletionEncoder(
        response_meta("cmpl", body.model),
        TokenText(server.loaded.tokenizer),
        prompts,
        prompt_texts,
        logprobs=body.logprobs is not None,
        choices=body.n,
        include_usage=include_usage(body),
    )
    return await respond(server, tenant, job, encoder, http_request)


def include_usage(body: OpenAIBase) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


async def prompt_texts_of(server: Ready, prompt: Any, prompts: list[list[int]]) -> list[str]:
    """What echo puts first: each prompt as sent, or the text of prompts sent as token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    tokenizer = server.loaded.tokenizer
    if tokenizer is None:
        return ["" for _ in prompts]
    decode = tokenizer.decode  # type: ignore[attr-defined]
    return [await run_in_threadpool(decode, ids) for ids in prompts]


class CompletionEncoder:
    """Choice i answers prompt i // n (OpenAI's order); with echo its text and log-probs
    start with the prompt's."""

    def __init__(
        self,
        meta: dict[str, Any],
        text_of: TokenText,
        prompts: list[list[int]],
        prompt_texts: list[str] | None,
        *,
        logprobs: bool,
        choices: int,
        include_usage: bool,
    ) -> None:
        self.meta = {**meta, "object": "text_completion"}
        self.text_of = text_of
        self.prompts = prompts
        self.prompt_texts = prompt_texts
        self.logprobs = logprobs
        self.choices = choices
        self.include_usage = include_usage
        self._streamed: dict[int, LegacyLogprobs] = {}  # choices that have sent a chunk

    def result(self, results: list[Result]) -> dict[str, Any]:
        choices = []
        for index, result in enumerate(results):
            scored = scored_output(result.token_ids, result.logprobs) if self.logprobs else []
            text, logprobs = self._with_prompt(
                index, result.text, scored, result.prompt_logprobs, first=True
            )
            choice = {"index": index, "text": text, "finish_reason": result.finish_reason}
            choices.append({**choice, "logprobs": logprobs})
        return {
            **self.meta,
            "choices": choices,
            "usage": openai_usage(
                [(r.prompt_tokens, len(r.token_ids)) for r in results], self.choices
            ),
        }

    def _with_prompt(
        self,
        index: int,
        text: str,
        scored: list[Scored],
        prompt_logprobs: list[ChosenLogprobs],
        *,
        first: bool,
    ) -> tuple[str, dict[str, Any] | None]:
        legacy = self._streamed.setdefault(index, LegacyLogprobs(self.text_of))
        if self.prompt_texts is not None and first:
            prompt = index // self.choices
            text = self.prompt_texts[prompt] + text
            if self.logprobs:
                scored = scored_prompt(self.prompts[prompt], prompt_logprobs) + scored
        return text, legacy.encode(scored) if self.logprobs else None

    def opening(self, choices: int) -> list[dict[str, Any]]:
        return []

    def chunk(self, chunk: Chunk, stream: RequestStream, index: int) -> dict[str, Any]:
        first = index not in self._streamed
        scored = scored_output(chunk.token_ids, chunk.logprobs) if self.logprobs else []
        text, logprobs = self._with_prompt(
            index, chunk.text, scored, stream.prompt_logprobs, first=first
        )
        choice = {"index": index, "text": text, "finish_reason": chunk.finish_reason}
        event = {**self.meta, "choices": [{**choice, "logprobs": logprobs}]}
        if self.include_usage:
            event["usage"] = None
        return event

    def closing(self, streams: list[RequestStream]) -> list[dict[str, Any]]:
        if not self.include_usage:
            return []
        return [{**self.meta, "choices": [], "usage": streamed_usage(streams)}]


@router.post("/v1/chat/completions", responses=STREAM_RESPONSE)
async def chat_completions(
    body: ChatCompletionRequest, http_request: Request, server: Server, tenant: Tenant
) -> Any:
    check_supported(body)
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(
            400,
            "invalid_request",
            "top_logprobs: only with logprobs set to true",
            field="top_logprobs",
        )
    choices = check_choices(server, body.n)
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    prompt = await chat_prompt(server, messages)
    max_tokens = (
        body.max_completion_tokens or body.max_tokens or server.settings.max_new_tokens_limit
    )
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    grammar = await constraint_of(server, body)
    sampling = sampling_params(
        server, body, max_new_tokens=max_tokens, logprobs=logprobs, grammar=grammar
    )
    job = Job([prompt], prefix_of(server, body.model), sampling, body.stream, choices=choices)
    job = await with_stored_ensemble(server, tenant, job)
    encoder = ChatEncoder(
        response_meta("chatcmpl", body.model),
        TokenText(server.loaded.tokenizer),
        logprobs=body.logprobs,
        include_usage=include_usage(body),
    )
    return await respond(server, tenant, job, encoder, http_request)


class ChatEncoder:
    def __init__(
        self, meta: dict[str, Any], text_of: TokenText, *, logprobs: bool, include_usage: bool
    ) -> None:
        self.meta = meta
        self.text_of = text_of
        self.logprobs = logprobs
        self.include_usage = include_usage

    def result(self, results: list[Result]) -> dict[str, Any]:
        choices = []
        for index, result in enumerate(results):
            message = {"role": "assistant", "content": result.text}
            choices.append(
                {
                    "index": index,
                    "message": message,
                    "finish_reason": result.finish_reason,
                    "logprobs": self._logprobs(result.token_ids, result.logprobs),
                }
            )
        return {
            **self.meta,
            "object": "chat.completion",
            "choices": choices,
            "usage": openai_usage(
                [(r.prompt_tokens, len(r.token_ids)) for r in results], len(results)
            ),
        }

    def _logprobs(self, token_ids: list[int], logprobs: list[Any]) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        return {"content": chat_content(self.text_of, scored_output(token_ids, logprobs))}

    def opening(self, choices: int) -> list[dict[str, Any]]:
        delta = {"role": "assistant", "content": ""}
        return [
            self._event({"index": i, "delta": delta, "logprobs": None, "finish_reason": None})
            for i in range(choices)
        ]

    def chunk(self, chunk: Chunk, stream: RequestStream, index: int) -> dict[str, Any]:
        delta = {"content": chunk.text} if chunk.text else {}
        logprobs = self._logprobs(chunk.token_ids, chunk.logprobs)
        choice = {"index": index, "delta": delta, "logprobs": logprobs}
        return self._event({**choice, "finish_reason": chunk.finish_reason})

    def closing(self, streams: list[RequestStream]) -> list[dict[str, Any]]:
        if not self.include_usage:
            return []
        return [{**self._event_meta(), "choices": [], "usage": streamed_usage(streams)}]

    def _event_meta(self) -> dict[str, Any]:
        return {**self.meta, "object": "chat.completion.chunk"}

    def _event(self, choice: dict[str, Any]) -> dict[str, Any]:
        event = {**self._event_meta(), "choices": [choice]}
        if self.include_usage:
            event["usage"] = None
        return event


def streamed_usage(streams: list[RequestStream]) -> dict[str, int]:
    """What a stream's last chunk says with include_usage: every choice's tokens (a stream
    has one prompt)."""
    counts = [(s.prompt_tokens, len(s.request.output_token_ids)) for s in streams]
    return openai_usage(counts, len(streams))


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
