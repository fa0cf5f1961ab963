"""Request and response bodies of the HTTP API (see docs/api.md)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

TokenIds = list[Annotated[int, Field(ge=0)]]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamplingFields(BaseModel):
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: list[str] | str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: list[str] | str | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        if len(stops) > 16:
            raise ValueError(f"at most 16 stop strings, found {len(stops)}")
        return stops


class GenerateRequest(SamplingFields, Strict):
    prompt: str | TokenIds
    prefix: str | None = None
    max_new_tokens: int = Field(64, ge=1)
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
    max_tokens: int | None = Field(None, ge=1)
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
    max_completion_tokens: int | None = Field(None, ge=1)
