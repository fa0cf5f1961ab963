"""vLLM's tokenizer routes: POST /tokenize, POST /detokenize, GET /tokenizer_info.

At the root, as vLLM serves them, where lm-evaluation-harness's remote tokenizer looks for them
(its `base_url` without `/v1/completions`); authenticated like every /v1 route. Tokenization is
the base model's: a request's `model` (the base model or a prefix) changes nothing. The
tokenizer runs on a worker thread, never on the event loop.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool

from server.api.auth import Server, Tenant
from server.api.errors import ApiError
from server.api.query import reject_unknown_query
from server.api.schemas import (
    ERROR_RESPONSES,
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
)
from server.api.services import Ready

router = APIRouter(responses=ERROR_RESPONSES, dependencies=[Depends(reject_unknown_query)])


def tokenizer_of(server: Ready, field: str) -> Any:
    tokenizer = server.loaded.tokenizer
    if tokenizer is None:
        raise ApiError(
            400,
            "invalid_request",
            f"{field}: this model has no tokenizer (the server takes and returns token ids only)",
            field=field,
        )
    return tokenizer


def max_model_len(server: Ready) -> int:
    """Positions per request as the engine counts them: --max-len, or fewer if the model has
    fewer positions."""
    return server.engine.core.max_len


def chat_template_of(tokenizer: Any) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the one used by default
        template = template.get("default")
    return template if isinstance(template, str) and template else None


def encode(tokenizer: Any, body: TokenizeRequest) -> tuple[list[int], list[str] | None]:
    """The ids and, if asked, their token strings."""
    ids = encode_ids(tokenizer, body)
    if not body.return_token_strs:
        return ids, None
    return ids, [t if isinstance(t, str) else "" for t in tokenizer.convert_ids_to_tokens(ids)]


def encode_ids(tokenizer: Any, body: TokenizeRequest) -> list[int]:
    """What the engine would be given: the text's ids, or the conversation's through the chat
    template (rendered, then tokenized, as vLLM does)."""
    if body.messages is None:
        assert body.prompt is not None  # the schema takes exactly one
        add_special = True if body.add_special_tokens is None else body.add_special_tokens
        return list(tokenizer.encode(body.prompt, add_special_tokens=add_special))
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    text = tokenizer.apply_chat_template(
        messages,
        add_generation_prompt=body.add_generation_prompt is not False,
        tokenize=False,
    )
    return list(tokenizer.encode(text, add_special_tokens=bool(body.add_special_tokens)))


@router.post("/tokenize", response_model=TokenizeResponse, response_model_exclude_none=True)
async def tokenize(body: TokenizeRequest, server: Server, _: Tenant) -> TokenizeResponse:
    chat = body.messages is not None
    field = "messages" if chat else "prompt"
    tokenizer = tokenizer_of(server, field)
    if chat and chat_template_of(tokenizer) is None:
        raise ApiError(
            400, "invalid_request", "messages: this model has no chat template", field=field
        )
    try:
        ids, strs = await run_in_threadpool(encode, tokenizer, body)
    except Exception as exc:  # a lone surrogate; a template refusing the conversation
        raise ApiError(
            400, "invalid_request", f"{field}: cannot be tokenized ({exc})", field=field
        ) from None
    return TokenizeResponse(
        count=len(ids), max_model_len=max_model_len(server), tokens=ids, token_strs=strs
    )


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, server: Server, _: Tenant) -> DetokenizeResponse:
    tokenizer = tokenizer_of(server, "tokens")
    vocab = server.loaded.spec.vocab_size
    bad = [t for t in body.tokens if t >= vocab]  # the schema refuses negative ids
    if bad:
        raise ApiError(
            400,
            "invalid_request",
            f"tokens: expected token ids in [0, {vocab}), found {bad[0]}",
            field="tokens",
        )
    try:
        text = await run_in_threadpool(tokenizer.decode, body.tokens)
    except Exception as exc:  # an id the model has but its tokenizer does not
        raise ApiError(
            400, "invalid_request", f"tokens: cannot be decoded ({exc})", field="tokens"
        ) from None
    return DetokenizeResponse(prompt=str(text))


@router.get("/tokenizer_info", response_model=TokenizerInfo)
async def tokenizer_info(server: Server, _: Tenant) -> TokenizerInfo:
    tokenizer = tokenizer_of(server, "tokenizer")

    def special(name: str) -> str | None:
        token = getattr(tokenizer, name, None)
        return None if token is None else str(token)

    return TokenizerInfo(
        tokenizer_class=type(tokenizer).__name__,
        bos_token=special("bos_token"),
        eos_token=special("eos_token"),
        pad_token=special("pad_token"),
        unk_token=special("unk_token"),
        model_max_length=max_model_len(server),
        chat_template=chat_template_of(tokenizer),
        vocab_size=len(tokenizer),
    )
