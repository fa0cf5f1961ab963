"""What the generation routes share: tokenising, sampling parameters, submitting, collecting."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from server.api.errors import ApiError, error_body
from server.api.problems import to_api_error
from server.api.schemas import SamplingFields
from server.api.services import Ready
from server.engine.request import SamplingParams
from server.engine.stream import RequestFailed, RequestStream, Result


async def tokenize(server: Ready, prompt: str | list[int]) -> list[int]:
    """Token ids of a prompt; text is tokenized on a worker thread, never on the event loop."""
    if isinstance(prompt, list):
        return prompt
    tokenizer = server.loaded.tokenizer
    if tokenizer is None:
        raise ApiError(
            400, "invalid_request", "prompt: this model has no tokenizer; send token ids"
        )
    try:
        ids = await run_in_threadpool(tokenizer.encode, prompt)  # type: ignore[attr-defined]
    except Exception as exc:  # text the tokenizer cannot take, e.g. a lone surrogate
        raise ApiError(400, "invalid_request", f"prompt: cannot be tokenized ({exc})") from None
    return list(ids)


async def chat_prompt(server: Ready, messages: list[dict[str, Any]]) -> list[int]:
    """Token ids of a conversation through the model's chat template, on a worker thread."""
    tokenizer = server.loaded.tokenizer
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "invalid_request", "messages: this model has no chat template")
    try:
        ids = await run_in_threadpool(
            tokenizer.apply_chat_template,  # type: ignore[attr-defined]
            messages,
            add_generation_prompt=True,
            tokenize=True,
        )
    except Exception as exc:  # a template can reject a conversation (roles, order, text)
        raise ApiError(400, "invalid_request", f"messages: {exc}") from None
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def sampling_params(
    server: Ready, fields: SamplingFields, *, max_new_tokens: int, ignore_eos: bool = False
) -> SamplingParams:
    limit = server.settings.max_new_tokens_limit
    if max_new_tokens > limit:
        raise ApiError(
            400,
            "invalid_request",
            f"max_new_tokens: expected at most {limit}, found {max_new_tokens}",
        )
    vocab = server.loaded.spec.vocab_size
    if fields.top_k > vocab:
        raise ApiError(
            422,
            "invalid_request",
            f"top_k: expected at most the vocabulary size {vocab}, found {fields.top_k}",
            field="top_k",
        )
    try:
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=fields.temperature,
            top_p=fields.top_p,
            top_k=fields.top_k,
            seed=fields.seed,
            stop=tuple(fields.stop or ()),
            ignore_eos=ignore_eos,
        )
    except ValueError as exc:
        raise ApiError(400, "invalid_request", str(exc)) from None


async def start(
    server: Ready,
    tenant: str,
    prompt: list[int],
    prefix_ref: str | None,
    sampling: SamplingParams,
    *,
    stream: bool,
) -> RequestStream:
    """Pin the prefix version (if any) and queue the request; the engine releases the pin.

    Text is decoded every step only for streams; otherwise once, at the end."""
    try:
        prefix, release = None, None
        if prefix_ref is not None:  # "" is a reference too (an invalid one), not the base model
            handle = await run_in_threadpool(server.registry.acquire, prefix_ref, tenant=tenant)
            prefix, release = handle.prefix, server.pins.admit(tenant, handle)
        return server.engine.submit(
            prompt, sampling, prefix=prefix, release=release, tenant=tenant, stream_text=stream
        )
    except ApiError:
        raise
    except Exception as exc:
        raise to_api_error(exc) from None


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
    except RequestFailed as exc:
        raise to_api_error(exc) from None
    finally:
        if not task.done():
            stream.cancel()
            task.cancel()


def failure_event(exc: RequestFailed) -> dict[str, Any]:
    """The SSE event that ends a stream whose request failed: the error shape of its status."""
    error = to_api_error(exc)
    return error_body(error.type, error.message)


def sse(data: dict[str, Any] | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n"


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
