"""The OpenAPI document states what this server accepts, not only the schemas' absolute bounds:
a client generated from /openapi.json (or a fuzzer reading it) learns there that `max_tokens`
stops at `--max-new-tokens-limit`, that token ids stop at the loaded model's vocabulary, what a
name looks like, how many members an ensemble takes, and so on. The request models stay as they
are (the server's own checks give the clearer messages); this writes their rules into the
document."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from prefixes.catalog.ensembles import MIN_MEMBERS
from prefixes.catalog.names import NAME_RULE
from server.api.openapi_rules import state_rules
from server.api.routes.openai import IGNORED_FIELDS
from server.api.routes.prefixes import MAX_FILES as MAX_UPLOAD_FILES
from server.api.schemas import (
    MAX_LOGIT_BIAS,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_TOKEN_ID_DIGITS,
    MIN_TEMPERATURE,
)
from server.config import Settings

GENERATION_BODIES = ("GenerateRequest", "CompletionRequest", "ChatCompletionRequest")
TOKEN_FIELDS = ("max_new_tokens", "max_tokens", "max_completion_tokens", "min_tokens")
_NAME = NAME_RULE.strip("^$")
# `owner/name`, or a bare `name` for the caller's own (prefixes/catalog/names.py)
REF_RULE = f"^({_NAME}/)?{_NAME}$"
# the job's `suffix` names the prefix it makes
NAMES = {"TenantCreate": ("name",), "EnsembleCreate": ("name",), "JobCreate": ("suffix",)}
REFS = {"GenerateRequest": ("prefix",)}
MEMBER_LISTS = {"GenerateRequest": "prefixes", "EnsembleCreate": "prefixes"}
# where token ids are sent: (schema, property)
TOKEN_IDS = (
    ("GenerateRequest", "prompt"),
    ("CompletionRequest", "prompt"),
    ("DetokenizeRequest", "tokens"),
)
NAMED_PATHS = (
    "/v1/prefixes/{owner}/{name}",
    "/v1/prefixes/{owner}/{name}/adapter",
    "/v1/ensembles/{owner}/{name}",
)


@dataclass(frozen=True)
class ServedModel:
    """What the document says of the loaded model."""

    model_id: str
    vocab_size: int


def state_server_bounds(
    document: dict[str, Any], settings: Settings, model: ServedModel | None
) -> dict[str, Any]:
    """`document` with the settings' limits, the naming rules and, once a model is loaded,
    its id and vocabulary written into the request schemas (in place)."""
    schemas = document.get("components", {}).get("schemas", {})
    _state_token_limits(schemas, settings)
    _state_transferability(schemas, settings)
    _state_sampling(schemas)
    _state_names(document, schemas)
    _state_members(schemas, settings)
    completion = schemas.get("CompletionRequest", {}).get("properties", {})
    for branch in completion.get("prompt", {}).get("anyOf", []):
        if branch.get("type") == "array" and branch.get("items", {}).get("type") != "integer":
            branch["maxItems"] = settings.max_prompts_per_call  # a list of prompts
    if "best_of" in completion:  # accepted only as what it would be anyway: one
        _bound(completion["best_of"], "integer", "minimum", 1)
        _bound(completion["best_of"], "integer", "maximum", 1)
    if model is not None:
        _state_vocabulary(schemas, model.vocab_size)
        _state_model_ids(schemas, model.model_id)
    _state_prompt_lengths(schemas, settings)
    _state_closed_bodies(schemas)
    _integer_bounds_as_integers(document)
    state_rules(document)
    return document


def _state_token_limits(schemas: dict[str, Any], settings: Settings) -> None:
    for name in GENERATION_BODIES:
        properties = schemas.get(name, {}).get("properties", {})
        for field in TOKEN_FIELDS:
            if field in properties:
                _bound(properties[field], "integer", "maximum", settings.max_new_tokens_limit)
        if "n" in properties:
            _bound(properties["n"], "integer", "maximum", settings.rows_per_request)


def _state_transferability(schemas: dict[str, Any], settings: Settings) -> None:
    transfer = schemas.get("TransferabilityRequest", {}).get("properties", {})
    if "candidates" in transfer:
        most = settings.max_transferability_candidates
        _bound(transfer["candidates"], "array", "maxItems", most)
    if "sample_size" in transfer:
        _bound(transfer["sample_size"], "integer", "maximum", settings.max_transferability_sample)


def _state_names(document: dict[str, Any], schemas: dict[str, Any]) -> None:
    for schema, fields in NAMES.items():
        for field in fields:
            _pattern(schemas.get(schema, {}).get("properties", {}).get(field), NAME_RULE)
    for schema, fields in REFS.items():
        for field in fields:
            _pattern(schemas.get(schema, {}).get("properties", {}).get(field), REF_RULE)
    candidates = schemas.get("TransferabilityRequest", {}).get("properties", {}).get("candidates")
    for branch in [] if candidates is None else candidates.get("anyOf", []):
        if branch.get("type") == "array":
            branch["uniqueItems"] = True
            _pattern(branch.get("items"), REF_RULE)
    paths = document.get("paths", {})
    for path in NAMED_PATHS:
        for operation in paths.get(path, {}).values():
            for parameter in operation.get("parameters", []):
                if parameter.get("in") == "path":
                    _pattern(parameter.get("schema"), NAME_RULE)
    for parameter in paths.get("/v1/prefixes", {}).get("get", {}).get("parameters", []):
        if parameter.get("name") == "cursor":  # the last prefix of the previous page, or none
            _pattern(parameter.get("schema"), f"^(({_NAME}/)?{_NAME})?$")
    upload = paths.get("/v1/prefixes", {}).get("post", {}).get("requestBody", {})
    form = upload.get("content", {}).get("multipart/form-data", {}).get("schema", {})
    _pattern(form.get("properties", {}).get("name"), NAME_RULE)
    if "files" in form.get("properties", {}):
        form["properties"]["files"].update(minItems=1, maxItems=MAX_UPLOAD_FILES)


def _state_members(schemas: dict[str, Any], settings: Settings) -> None:
    most = min(settings.max_ensemble_members, settings.rows_per_request)
    for schema, field in MEMBER_LISTS.items():
        members = schemas.get(schema, {}).get("properties", {}).get(field)
        if members is None:
            continue
        stored = schema == "EnsembleCreate"  # a stored ensemble is checked when it runs
        _bound(members, "array", "minItems", MIN_MEMBERS)
        _bound(members, "array", "maxItems", settings.max_ensemble_members if stored else most)
        for branch in [members, *members.get("anyOf", [])]:
            if branch.get("type") == "array":
                branch["uniqueItems"] = True
                _pattern(branch.get("items"), REF_RULE)


# Bodies that take extra fields only to refuse them by name (400 "not supported by this
# server"), besides OpenAI's fields that change nothing and are accepted (routes/openai.py).
CLOSED_BODIES = {
    "JobCreate": (),
    "CompletionRequest": IGNORED_FIELDS,
    "ChatCompletionRequest": IGNORED_FIELDS,
}


def _state_closed_bodies(schemas: dict[str, Any]) -> None:
    for name, ignored in CLOSED_BODIES.items():
        if name in schemas:
            schemas[name]["additionalProperties"] = False
            for field in sorted(ignored):
                schemas[name]["properties"].setdefault(field, {"description": "accepted, ignored"})


def _integer_bounds_as_integers(node: Any) -> None:
    """pydantic writes an integer's bounds as floats (2**63 as 9.223372036854776e18, which a
    client comparing exactly reads wrong): write them as the integers they are."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
                if isinstance(node.get(key), float) and node[key].is_integer():
                    node[key] = int(node[key])
        for value in node.values():
            _integer_bounds_as_integers(value)
    elif isinstance(node, list):
        for value in node:
            _integer_bounds_as_integers(value)


def _state_sampling(schemas: dict[str, Any]) -> None:
    """The stop strings' and the temperature's own rules (SamplingFields' validators)."""
    for name in GENERATION_BODIES:
        properties = schemas.get(name, {}).get("properties", {})
        for branch in properties.get("stop", {}).get("anyOf", []):
            strings = branch.get("items", {}) if branch.get("type") == "array" else branch
            if strings.get("type") == "string":
                strings.update(minLength=1, maxLength=MAX_STOP_CHARS)
            if branch.get("type") == "array":
                branch["maxItems"] = MAX_STOP_STRINGS
        for branch in properties.get("temperature", {}).get("anyOf", []):
            if branch.get("type") == "number":  # 0 is greedy; just above it would overflow
                branch["not"] = {"exclusiveMinimum": 0, "exclusiveMaximum": MIN_TEMPERATURE}
        for branch in properties.get("logit_bias", {}).get("anyOf", []):
            if branch.get("type") == "object":
                branch["maxProperties"] = MAX_LOGIT_BIAS
                branch["propertyNames"] = {
                    "pattern": f"^(0|[1-9][0-9]{{0,{MAX_TOKEN_ID_DIGITS - 1}}})$"
                }


def _state_model_ids(schemas: dict[str, Any], model_id: str) -> None:
    """An OpenAI `model` names the served model, or a prefix (or stored ensemble) to use."""
    rule = f"^({re.escape(model_id)}|({_NAME}/)?{_NAME})$"
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        _pattern(schemas.get(name, {}).get("properties", {}).get("model"), rule)


def _state_vocabulary(schemas: dict[str, Any], vocab_size: int) -> None:
    for schema, field in TOKEN_IDS:
        ids = schemas.get(schema, {}).get("properties", {}).get(field)
        if ids is not None:
            _token_ids_below(ids, vocab_size)
    for name in GENERATION_BODIES:
        properties = schemas.get(name, {}).get("properties", {})
        if "top_k" in properties:
            _bound(properties["top_k"], "integer", "maximum", vocab_size)
        for branch in properties.get("logit_bias", {}).get("anyOf", []):
            if branch.get("type") == "object":
                branch["propertyNames"] = {"pattern": f"^{integers_below(vocab_size)}$"}


def integers_below(limit: int) -> str:
    """A regular expression for the integers 0 .. limit - 1 in decimal, without leading zeros
    (a JSON Schema pattern cannot compare numbers written as strings)."""
    top = str(limit - 1)
    branches = ["[0-9]"] + [f"[1-9][0-9]{{{n - 1}}}" for n in range(2, len(top))]
    if len(top) > 1:  # numbers of top's length, digit by digit up to top
        for i, digit in enumerate(top):
            low = 1 if i == 0 else 0
            if int(digit) > low:
                rest = len(top) - i - 1
                tail = f"[0-9]{{{rest}}}" if rest else ""
                branches.append(f"{top[:i]}[{low}-{int(digit) - 1}]{tail}")
        branches.append(top)
    else:
        branches = [f"[0-{top}]"]
    return "(" + "|".join(branches) + ")"


def _state_prompt_lengths(schemas: dict[str, Any], settings: Settings) -> None:
    """A prompt of token ids leaves a position to generate in (prefixes take more: a rule)."""
    for schema, field in TOKEN_IDS[:2]:
        prompt = schemas.get(schema, {}).get("properties", {}).get(field, {})
        for branch in prompt.get("anyOf", []):
            if branch.get("type") == "array" and branch.get("items", {}).get("type") == "integer":
                branch["maxItems"] = settings.max_len - 1
            items = branch.get("items", {})
            if branch.get("type") == "array" and items.get("type") == "array":
                items["maxItems"] = settings.max_len - 1


def _token_ids_below(schema: dict[str, Any], vocab_size: int) -> None:
    """Every integer in `schema` (token ids, in lists or lists of lists) below the vocabulary."""
    if schema.get("type") == "integer":
        schema["maximum"] = min(vocab_size - 1, schema.get("maximum", vocab_size))
    for branch in schema.get("anyOf", []):
        _token_ids_below(branch, vocab_size)
    if isinstance(schema.get("items"), dict):
        _token_ids_below(schema["items"], vocab_size)


def _pattern(schema: dict[str, Any] | None, rule: str) -> None:
    """The rule on the schema's string branch (itself, or one of its anyOf)."""
    if schema is None:
        return
    for branch in [schema, *schema.get("anyOf", [])]:
        if branch.get("type") == "string":
            branch["pattern"] = rule


def _bound(schema: dict[str, Any], kind: str, keyword: str, value: int) -> None:
    """Set `keyword` on the schema's branch of type `kind` (itself, or one of its anyOf); a
    default past a new maximum becomes the maximum, as the server applies it."""
    for branch in [schema, *schema.get("anyOf", [])]:
        if branch.get("type") == kind:
            if keyword.startswith("max"):
                branch[keyword] = min(value, branch.get(keyword, value))
            else:
                branch[keyword] = max(value, branch.get(keyword, value))
    if keyword == "maximum" and isinstance(schema.get("default"), int):
        schema["default"] = min(schema["default"], value)
