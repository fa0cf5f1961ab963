"""Request and response bodies of the HTTP API (see docs/api.md)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    field_validator,
    model_validator,
)

from prefixes.catalog.catalog import MAX_DESCRIPTION as MAX_PREFIX_DESCRIPTION
from prefixes.catalog.records import QUOTA_LIMITS, RATE_LIMIT_MAX
from server.engine.request import MAX_LOGPROBS

# Bounds every request field states, so no value can overflow a tensor or a loop later on.
MIN_TEMPERATURE = 0.01  # below this (but above 0) float32 logits / temperature can overflow
MAX_TEMPERATURE = 100.0
MAX_TOP_K = 1 << 20  # the vocabulary bound is checked against the model (server/api/generation.py)
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256  # every stop string is searched for after every token
MAX_TOKENS_FIELD = 1 << 20  # max_tokens, max_new_tokens: the server's own limit is lower
MAX_ENSEMBLE_FIELD = 256  # prefixes in an ensemble: the server's own limit is lower
MAX_LOGIT_BIAS = 300  # entries, as OpenAI allows
MAX_BIAS = 100.0
MAX_TOKEN_ID_DIGITS = 9  # a logit_bias key: vocabularies have fewer than 10**9 tokens
MAX_PENALTY = 2.0  # presence and frequency penalties, OpenAI's range
MAX_REPETITION_PENALTY = 10.0
MAX_CHOICES_FIELD = 128  # n: the server's own limit is lower
MAX_TOKENIZE_CHARS = 1 << 20  # a text to tokenize (/tokenize); the body limit is lower by default
MAX_CHAT_MESSAGES = 4096  # messages in one conversation to tokenize (/tokenize)
MAX_CONSTRAINT_CHARS = 64 << 10  # a regex or grammar; a schema is bounded by its size as JSON
MAX_CHOICES = 256  # strings of a `choice` constraint


def _whole(value: Any) -> Any:
    """JSON Schema's integer includes 3.0: take it as 3 (strict fields still refuse true, "3"
    and 3.5)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


WHOLE = BeforeValidator(_whole)
StrictTokenId = Annotated[int, Field(ge=0, strict=True), WHOLE]
# Ids past the vocabulary are refused against the model (400), before any tensor is built.
TokenIds = list[StrictTokenId]


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
    429: "overloaded, or over the tenant's rate limits: retry after Retry-After seconds",
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


class StructuredOutputs(Strict):
    """Exactly one constraint on the output (docs/api.md, "Structured outputs"): vLLM's
    `structured_outputs` fields."""

    json_schema: dict[str, Any] | None = Field(None, alias="json")  # a JSON schema
    json_object: bool | None = None  # true: any JSON object
    regex: str | None = Field(None, min_length=1, max_length=MAX_CONSTRAINT_CHARS)
    choice: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, min_length=1, max_length=MAX_CHOICES
    )
    grammar: str | None = Field(None, min_length=1, max_length=MAX_CONSTRAINT_CHARS)  # Lark

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        given = [name for name in self.model_fields_set if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                "expected exactly one of json, json_object, regex, choice, grammar, "
                f"found {len(given)}"
            )
        return self


class JsonSchemaFormat(Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    json_schema: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None  # the schema is always enforced (docs/api.md)


class ResponseFormat(Strict):
    """OpenAI's `response_format`."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError('json_schema: expected exactly with type "json_schema"')
        return self


class SamplingFields(BaseModel):
    # Unset (null): the model's own default from its generation_config.json, else OpenAI's
    # (temperature 1, top_p 1, no top-k cut, no repetition penalty); docs/api.md.
    temperature: float | None = Field(None, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: Annotated[int, Field(strict=True, ge=0, le=MAX_TOP_K), WHOLE] | None = None
    seed: Annotated[int, Field(strict=True, ge=0, lt=2**63), WHOLE] | None = None
    stop: list[str] | str | None = None
    # Logits processing (docs/api.md, "Penalties and bias"), per request, before sampling.
    presence_penalty: float = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY)
    frequency_penalty: float = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY)
    repetition_penalty: float | None = Field(None, gt=0.0, le=MAX_REPETITION_PENALTY)
    # token id (as a string, as OpenAI sends it) -> a value added to its logit
    logit_bias: dict[str, Annotated[float, Field(ge=-MAX_BIAS, le=MAX_BIAS)]] | None = Field(
        None, max_length=MAX_LOGIT_BIAS
    )
    min_tokens: Annotated[int, Field(strict=True, ge=0, le=MAX_TOKENS_FIELD), WHOLE] = 0
    structured_outputs: StructuredOutputs | None = None

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float | None) -> float | None:
        if value is not None and 0 < value < MIN_TEMPERATURE:
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

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        """Keys are token ids written in ASCII digits (OpenAI sends them as strings), each id
        once: "5" and "05" would otherwise both add to token 5."""
        ids: dict[str, float] = {}
        for key, bias in (value or {}).items():
            if not (key.isascii() and key.isdigit() and len(key) <= MAX_TOKEN_ID_DIGITS):
                raise ValueError(f"expected token ids as keys, found {key[:32]!r}")
            token = str(int(key))
            if token in ids:
                raise ValueError(f"token id {token} given twice")
            ids[token] = bias
        return ids if value is not None else None


class GenerateRequest(SamplingFields, Strict):
    prompt: str | TokenIds
    prefix: str | None = None  # a prefix, or a stored ensemble
    # A prompt ensemble: these prefixes instead of `prefix`, combined by `ensemble`.
    prefixes: list[str] | None = Field(None, max_length=MAX_ENSEMBLE_FIELD)
    ensemble: Literal["vote", "mean"] | None = None
    # 0 only scores the prompt (with prompt_logprobs)
    max_new_tokens: Annotated[int, Field(strict=True, ge=0, le=MAX_TOKENS_FIELD), WHOLE] = 64
    ignore_eos: bool = False
    stream: bool = False
    # Log-probs of each generated token and of each prompt token, each with this many most
    # likely alternatives (docs/api.md, "Log-probabilities").
    logprobs: Annotated[int, Field(strict=True, ge=0, le=MAX_LOGPROBS), WHOLE] | None = None
    prompt_logprobs: Annotated[int, Field(strict=True, ge=0, le=MAX_LOGPROBS), WHOLE] | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    prefix_tokens: int = 0
    total_tokens: int = 0


class Candidate(BaseModel):
    prefix: str
    text: str
    token_ids: list[int]
    finish_reason: str
    mean_logprob: float  # the model's mean log-probability of the candidate's tokens


class EnsembleOutcome(BaseModel):
    method: Literal["vote", "mean"]
    members: list[str]
    ensemble: str | None = None  # the stored ensemble used, if any
    candidates: list[Candidate] | None = None  # vote: every member's answer
    votes: dict[str, int] | None = None  # vote: how many members gave each text


class TopLogprob(BaseModel):
    token_id: int
    logprob: float


class TokenLogprob(BaseModel):
    token_id: int
    logprob: float
    top_logprobs: list[TopLogprob]


class GenerateResponse(BaseModel):
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    ensemble: EnsembleOutcome | None = None
    logprobs: list[TokenLogprob] | None = None  # with `logprobs`: one per token_ids
    # with `prompt_logprobs`: one per prompt token, the first null (nothing precedes it)
    prompt_logprobs: list[TokenLogprob | None] | None = None


class EnsembleCreate(Strict):
    name: str
    prefixes: list[str] = Field(max_length=MAX_ENSEMBLE_FIELD)
    method: Literal["vote", "mean"] = "vote"
    visibility: Literal["private", "public"] = "private"
    description: str = ""


class EnsembleObject(BaseModel):
    id: str
    owner: str
    name: str
    method: str
    prefixes: list[str]
    visibility: str
    description: str
    created_at: str


class EnsembleList(BaseModel):
    data: list[EnsembleObject]


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


class PrefixUpdate(Strict):
    """PATCH /v1/prefixes/{owner}/{name}: what changes in place (absent: unchanged)."""

    visibility: Literal["private", "public"] | None = None
    description: str | None = Field(None, max_length=MAX_PREFIX_DESCRIPTION)


class PrefixPage(BaseModel):
    data: list[PrefixInfo]
    next: str | None


class StreamOptions(Strict):
    include_usage: bool = False  # a last chunk with the usage and no choices


# OpenAI-compatible bodies. Unknown fields are accepted (clients send many); fields we cannot
# honour are refused with a clear 400 when set to anything but their default.
class OpenAIBase(SamplingFields):
    model_config = ConfigDict(extra="allow")

    model: str
    n: Annotated[int, Field(strict=True, ge=1, le=MAX_CHOICES_FIELD), WHOLE] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None


class CompletionRequest(OpenAIBase):
    prompt: str | list[str] | TokenIds | list[TokenIds]
    # 0 only with echo: the prompt scored, nothing generated
    max_tokens: Annotated[int, Field(strict=True, ge=0, le=MAX_TOKENS_FIELD), WHOLE] | None = None
    logprobs: Annotated[int, Field(strict=True, ge=0, le=MAX_LOGPROBS), WHOLE] | None = None
    echo: bool = False
    best_of: int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = ""


class ChatCompletionRequest(OpenAIBase):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Annotated[int, Field(strict=True, ge=1, le=MAX_TOKENS_FIELD), WHOLE] | None = None
    max_completion_tokens: (
        Annotated[int, Field(strict=True, ge=1, le=MAX_TOKENS_FIELD), WHOLE] | None
    ) = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(strict=True, ge=0, le=MAX_LOGPROBS), WHOLE] | None = (
        None  # with logprobs only
    )


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


class TenantRateLimits(BaseModel):
    """Effective limits per minute (the tenant's own, else the server's defaults), whole:
    with replicas each enforces its share (docs/reliability.md)."""

    requests_per_minute: int
    tokens_per_minute: int


class TenantInfo(BaseModel):
    tenant: str
    created_at: str
    quotas: TenantQuotas
    rate_limits: TenantRateLimits
    usage: TenantUsage


# A quota sent in a PATCH: a JSON integer (not a string, float or boolean) within the column.
_MaxPrefixes = Annotated[int, Field(strict=True, ge=0, le=QUOTA_LIMITS["max_prefixes"]), WHOLE]
_MaxBytes = Annotated[int, Field(strict=True, ge=0, le=QUOTA_LIMITS["max_bytes"]), WHOLE]
_PerMinute = Annotated[int, Field(strict=True, ge=0, le=RATE_LIMIT_MAX), WHOLE]
_MaxVirtualTokens = Annotated[
    int, Field(strict=True, ge=0, le=QUOTA_LIMITS["max_virtual_tokens"]), WHOLE
]


class UsageLine(BaseModel):
    """What one tenant used of one model in one bucket (docs/api.md, "Usage")."""

    start_time: int
    end_time: int
    tenant: str
    model: str | None  # a prefix or stored ensemble, the base model's id; null: refused unread
    requests: int
    rows: int
    prompt_tokens: int
    completion_tokens: int
    virtual_tokens: int
    tuning_tokens: int
    failed_invalid: int
    failed_rate_limited: int
    failed_overloaded: int
    failed_error: int
    cancelled: int


class UsageReport(BaseModel):
    object: Literal["list"] = "list"
    group_by: Literal["prefix", "day", "hour"]
    start_time: int
    end_time: int
    data: list[UsageLine]
    next: str | None


class QuotaUpdate(Strict):
    """Only the fields sent change; null makes a quota follow the server's default again."""

    max_prefixes: _MaxPrefixes | None = None
    max_bytes: _MaxBytes | None = None
    max_virtual_tokens: _MaxVirtualTokens | None = None
    requests_per_minute: _PerMinute | None = None
    tokens_per_minute: _PerMinute | None = None


# Fine-tuning: OpenAI's shapes (docs/fine-tuning.md), so the official client works unchanged.
class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str = "processed"  # validated on upload: a stored file is ready
    status_details: str | None = None
    expires_at: int | None = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool
    first_id: str | None
    last_id: str | None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


MAX_EPOCHS = 50
MAX_BATCH_SIZE = 64
MAX_LEARNING_RATE_MULTIPLIER = 100.0
MAX_VIRTUAL_TOKENS_FIELD = 1 << 16  # the server's own limit is lower (--max-virtual-tokens)

_Epochs = Annotated[int, Field(strict=True, ge=1, le=MAX_EPOCHS), WHOLE]
_BatchSize = Annotated[int, Field(strict=True, ge=1, le=MAX_BATCH_SIZE), WHOLE]
_Multiplier = Annotated[float, Field(gt=0, le=MAX_LEARNING_RATE_MULTIPLIER, allow_inf_nan=False)]


class HyperparametersIn(Strict):
    """Each an explicit value or "auto" (the server's default, docs/fine-tuning.md)."""

    n_epochs: Literal["auto"] | _Epochs = "auto"
    batch_size: Literal["auto"] | _BatchSize = "auto"
    learning_rate_multiplier: Literal["auto"] | _Multiplier = "auto"


class MethodSettings(Strict):
    num_virtual_tokens: (
        Annotated[int, Field(strict=True, ge=1, le=MAX_VIRTUAL_TOKENS_FIELD), WHOLE] | None
    ) = None
    hyperparameters: HyperparametersIn | None = None


class MethodIn(Strict):
    """`{"type": T, T: {...}}` as OpenAI's `method`; only the settings of `type` may be sent."""

    type: Literal["prefix_tuning", "prompt_tuning", "supervised"]
    prefix_tuning: MethodSettings | None = None
    prompt_tuning: MethodSettings | None = None
    supervised: MethodSettings | None = None

    @model_validator(mode="after")
    def _one_method(self) -> MethodIn:
        for other in ("prefix_tuning", "prompt_tuning", "supervised"):
            if other != self.type and getattr(self, other) is not None:
                raise ValueError(f"{other}: settings of another method than type {self.type!r}")
        return self

    @property
    def settings(self) -> MethodSettings | None:
        found: MethodSettings | None = getattr(self, self.type)
        return found


class JobCreate(BaseModel):
    # Unknown fields are refused by the route with a 400 naming them, as on /v1/completions.
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=256)
    training_file: str = Field(min_length=1, max_length=64)
    validation_file: str | None = Field(None, min_length=1, max_length=64)
    hyperparameters: HyperparametersIn | None = None
    suffix: str | None = Field(None, max_length=64)
    seed: Annotated[int, Field(strict=True, ge=0, le=2**31 - 1), WHOLE] | None = None
    method: MethodIn | None = None


class JobErrorObject(BaseModel):
    code: str
    message: str
    param: str | None


class HyperparametersOut(BaseModel):
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float


class MethodSettingsOut(BaseModel):
    num_virtual_tokens: int
    hyperparameters: HyperparametersOut


class MethodOut(BaseModel):
    type: str
    prefix_tuning: MethodSettingsOut | None = None
    prompt_tuning: MethodSettingsOut | None = None


class JobObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobErrorObject | None
    fine_tuned_model: str | None
    finished_at: int | None
    hyperparameters: HyperparametersOut
    model: str
    organization_id: str  # the tenant
    result_files: list[str]
    seed: int
    status: str
    trained_tokens: int | None
    training_file: str
    validation_file: str | None
    estimated_finish: int | None = None
    integrations: list[Any] | None = None
    method: MethodOut
    user_provided_suffix: str | None
    metadata: dict[str, str] | None = None


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobObject]
    has_more: bool


class EventObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    message: str
    data: dict[str, Any] | None
    type: str


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EventObject]
    has_more: bool


# Transferability (docs/fine-tuning.md): candidate prefixes ranked by their loss on a file.
MAX_TRANSFER_CANDIDATES_FIELD = 1024  # the server's own limit is lower
MAX_TRANSFER_SAMPLE_FIELD = 4096  # the server's own limit is lower


class TransferabilityRequest(Strict):
    training_file: str = Field(min_length=1, max_length=64)
    # prefix references (an own prefix also by its name); default: the tenant's own and the
    # public ones usable on the served model, at most --max-transferability-candidates
    candidates: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(
        None, min_length=1, max_length=MAX_TRANSFER_CANDIDATES_FIELD
    )
    # examples scored; default (and at most) --max-transferability-sample
    sample_size: (
        Annotated[int, Field(strict=True, ge=1, le=MAX_TRANSFER_SAMPLE_FIELD), WHOLE] | None
    ) = None
    seed: Annotated[int, Field(strict=True, ge=0, le=2**31 - 1), WHOLE] = 0  # which examples


class CandidateScore(BaseModel):
    prefix: str  # owner/name
    version: int
    kind: str
    num_virtual_tokens: int
    loss: float | None  # mean loss per target token; null: see error
    error: str | None = None


class TransferabilityObject(BaseModel):
    object: Literal["fine_tuning.transferability"] = "fine_tuning.transferability"
    model: str  # the served model's id
    training_file: str
    seed: int
    lines: list[int]  # the examples scored: their lines in the file
    target_tokens: int  # tokens each loss is the mean of
    base_loss: float | None  # the served model's own, without a prefix
    data: list[CandidateScore]  # lowest loss first
    truncated: bool  # default candidates: more were usable than the bound allows


class CheckpointObject(BaseModel):
    """OpenAI's `fine_tuning.job.checkpoint`. `fine_tuned_model_checkpoint` names the
    checkpoint; it is training state, not a servable model (docs/fine-tuning.md)."""

    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: dict[str, float | int]
    step_number: int


class CheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[CheckpointObject]
    has_more: bool
    first_id: str | None
    last_id: str | None


# vLLM's tokenizer routes: /tokenize, /detokenize, /tokenizer_info (docs/api.md). `model` is
# accepted and ignored: tokenization is the base model's, whatever prefix a request names.
class TokenizeRequest(Strict):
    """vLLM's two bodies in one: a text `prompt`, or chat `messages` (through the model's chat
    template); exactly one of them."""

    model: str | None = None
    prompt: str | None = Field(None, max_length=MAX_TOKENIZE_CHARS)
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=MAX_CHAT_MESSAGES)
    # messages only; default true
    add_generation_prompt: StrictBool | None = None
    # default: true for a prompt, false for messages (the chat template writes its own)
    add_special_tokens: StrictBool | None = None
    return_token_strs: StrictBool = False

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("expected exactly one of prompt and messages")
        if self.prompt is not None and self.add_generation_prompt is not None:
            raise ValueError("add_generation_prompt: only with messages")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int  # positions per request on this server: prefix + prompt + output
    tokens: list[int]
    token_strs: list[str] | None = None  # with return_token_strs only


class DetokenizeRequest(Strict):
    model: str | None = None
    # JSON integers only (5.0 is one): "5", 5.5 and true are refused, not read as ids
    tokens: list[StrictTokenId] = Field(max_length=MAX_TOKENS_FIELD)


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    """What lm-evaluation-harness's remote tokenizer reads (tokenizer_config.json's names)."""

    tokenizer_class: str
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    unk_token: str | None
    model_max_length: int  # this server's, as max_model_len on /tokenize
    chat_template: str | None
    vocab_size: int  # the tokenizer's, with its added tokens
