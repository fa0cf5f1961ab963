"""Request and response bodies of the HTTP API (see docs/api.md)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from prefixes.records import QUOTA_LIMITS

# Bounds every request field states, so no value can overflow a tensor or a loop later on.
MIN_TEMPERATURE = 0.01  # below this (but above 0) float32 logits / temperature can overflow
MAX_TEMPERATURE = 100.0
MAX_TOP_K = 1 << 20  # the vocabulary bound is checked against the model (server/api/generation.py)
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256  # every stop string is searched for after every token
MAX_TOKENS_FIELD = 1 << 20  # max_tokens, max_new_tokens: the server's own limit is lower

# Ids past the vocabulary are refused against the model (400), before any tensor is built.
TokenIds = list[Annotated[int, Field(ge=0)]]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")  # field, expected, found, details, limit, ...

    type: str
    message: str


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer (docs/api.md)."""

    error: ErrorDetail


_ERROR_STATUSES = {
    400: "a request the server cannot run",
    401: "no key, or an unknown or revoked one",
    403: "admin routes without an admin key configured; another tenant's keys or quotas",
    404: "no such tenant or prefix (or another tenant's private one)",
    409: "name taken, a prefix compiled for another model, or a key limit (last key, too many)",
    413: "body over the size limit",
    415: "an upload that is not multipart/form-data",
    422: "invalid fields or values; the message names them",
    429: "overloaded: retry after Retry-After seconds",
    500: "a bug in the server, never bad input",
    503: "starting, stopping, or startup failed",
}
# What every /v1 route may answer besides its success, for the OpenAPI document.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text} for status, text in _ERROR_STATUSES.items()
}
# A generation route's 200 when `stream` is true.
STREAM_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "JSON, or with stream=true server-sent events ending with data: [DONE]",
        "content": {"text/event-stream": {}},  # events: JSON objects, then the string [DONE]
    }
}


class SamplingFields(BaseModel):
    temperature: float = Field(1.0, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=MAX_TOP_K)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: list[str] | str | None = None

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float) -> float:
        if 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"expected 0 (greedy) or at least {MIN_TEMPERATURE}, found {value}")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: list[str] | str | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, found {len(stops)}")
        longest = max(map(len, stops), default=0)
        if longest > MAX_STOP_CHARS:
            raise ValueError(
                f"stop strings of at most {MAX_STOP_CHARS} characters, found {longest}"
            )
        return stops


class GenerateRequest(SamplingFields, Strict):
    prompt: str | TokenIds
    prefix: str | None = None
    max_new_tokens: int = Field(64, ge=1, le=MAX_TOKENS_FIELD)
    ignore_eos: bool = False
    stream: bool = False


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    prefix_tokens: int = 0
    total_tokens: int = 0


class GenerateResponse(BaseModel):
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage


class TenantCreate(Strict):
    name: str


class TenantCreated(BaseModel):
    tenant: str
    api_key: str


class PrefixInfo(BaseModel):
    id: str
    owner: str
    name: str
    version: int
    kind: str
    num_virtual_tokens: int
    bytes: int
    sha256: str
    visibility: str
    description: str = ""
    created_at: str
    model_fingerprint: str
    compatible: bool


class PrefixPage(BaseModel):
    data: list[PrefixInfo]
    next: str | None


# OpenAI-compatible bodies. Unknown fields are accepted (clients send many); fields we cannot
# honour are refused with a clear 400 when set to anything but their default.
class OpenAIBase(SamplingFields):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_FIELD)
    n: int = Field(1, ge=1)
    stream: bool = False
    logprobs: bool | int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


class CompletionRequest(OpenAIBase):
    prompt: str | list[str] | TokenIds | list[TokenIds]
    echo: bool = False
    best_of: int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = ""


class ChatCompletionRequest(OpenAIBase):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_FIELD)


# Tenant administration: keys and quotas (docs/api.md).
class KeyObject(BaseModel):
    key_id: str
    created_at: str
    revoked: bool
    current: bool  # the key this request was sent with


class KeyList(BaseModel):
    data: list[KeyObject]


class KeyIssued(BaseModel):
    tenant: str
    key_id: str
    api_key: str


class TenantQuotas(BaseModel):
    """Effective quotas: null means no limit."""

    max_prefixes: int | None
    max_bytes: int | None
    max_virtual_tokens: int | None


class TenantUsage(BaseModel):
    prefixes: int
    bytes: int


class TenantInfo(BaseModel):
    tenant: str
    created_at: str
    quotas: TenantQuotas
    usage: TenantUsage


# A quota sent in a PATCH: a JSON integer (not a string, float or boolean) within the column.
_MaxPrefixes = Annotated[int, Field(strict=True, ge=0, le=QUOTA_LIMITS["max_prefixes"])]
_MaxBytes = Annotated[int, Field(strict=True, ge=0, le=QUOTA_LIMITS["max_bytes"])]
_MaxVirtualTokens = Annotated[int, Field(strict=True, ge=0, le=QUOTA_LIMITS["max_virtual_tokens"])]


class QuotaUpdate(Strict):
    """Only the fields sent change; null makes a quota follow the server's default again."""

    max_prefixes: _MaxPrefixes | None = None
    max_bytes: _MaxBytes | None = None
    max_virtual_tokens: _MaxVirtualTokens | None = None
