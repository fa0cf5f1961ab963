"""The OpenAPI document states the limits this server runs with, not only the schemas' absolute
bounds: a client generated from /openapi.json (or a fuzzer reading it) learns there that
`max_tokens` stops at `--max-new-tokens-limit`, `n` at what one tenant may run, and so on."""

from __future__ import annotations

from typing import Any

from server.config import Settings

GENERATION_BODIES = ("GenerateRequest", "CompletionRequest", "ChatCompletionRequest")
TOKEN_FIELDS = ("max_new_tokens", "max_tokens", "max_completion_tokens", "min_tokens")


def state_settings_bounds(document: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """`document` with the settings' limits written into its request schemas (in place)."""
    schemas = document.get("components", {}).get("schemas", {})
    rows = [settings.max_choices, settings.num_slots]
    if settings.max_running_per_tenant:
        rows.append(settings.max_running_per_tenant)
    for name in GENERATION_BODIES:
        properties = schemas.get(name, {}).get("properties", {})
        for field in TOKEN_FIELDS:
            if field in properties:
                _bound(properties[field], "integer", "maximum", settings.max_new_tokens_limit)
        if "n" in properties:
            _bound(properties["n"], "integer", "maximum", min(rows))
    generate = schemas.get("GenerateRequest", {}).get("properties", {})
    if "prefixes" in generate:
        members = min(settings.max_ensemble_members, *rows[1:])
        _bound(generate["prefixes"], "array", "maxItems", members)
    completion = schemas.get("CompletionRequest", {}).get("properties", {})
    for branch in completion.get("prompt", {}).get("anyOf", []):
        if branch.get("type") == "array" and branch.get("items", {}).get("type") != "integer":
            branch["maxItems"] = settings.max_prompts_per_call  # a list of prompts
    transfer = schemas.get("TransferabilityRequest", {}).get("properties", {})
    if "candidates" in transfer:
        _bound(transfer["candidates"], "array", "maxItems", settings.max_transferability_candidates)
    if "sample_size" in transfer:
        _bound(transfer["sample_size"], "integer", "maximum", settings.max_transferability_sample)
    return document


def _bound(schema: dict[str, Any], kind: str, keyword: str, value: int) -> None:
    """Set `keyword` on the schema's branch of type `kind` (itself, or one of its anyOf); a
    default past a new maximum becomes the maximum, as the server applies it."""
    for branch in [schema, *schema.get("anyOf", [])]:
        if branch.get("type") == kind:
            branch[keyword] = min(value, branch.get(keyword, value))
    if keyword == "maximum" and isinstance(schema.get("default"), int):
        schema["default"] = min(schema["default"], value)
