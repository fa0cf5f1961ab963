"""A request's output constraint, from `structured_outputs` or OpenAI's `response_format`,
compiled off the event loop (engine/grammar.py) into what the engine's sampling takes."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi.concurrency import run_in_threadpool

from server.api.errors import ApiError
from server.api.schemas import ResponseFormat, SamplingFields, StructuredOutputs
from server.api.services import Ready
from server.engine.grammar import Grammar
from server.engine.request import InvalidRequest

# Checking a constraint takes milliseconds (engine/grammar.py), bounded by llguidance's limits;
# one that takes this long is refused (its thread still ends within those limits).
COMPILE_TIMEOUT_S = 10.0


async def constraint_of(server: Ready, fields: SamplingFields) -> Grammar | None:
    """The request's compiled constraint, or None; a 400 naming the field when it is invalid."""
    response_format: ResponseFormat | None = getattr(fields, "response_format", None)
    wanted = _wanted(fields.structured_outputs, response_format)
    if wanted is None:
        return None
    field, kind, value = wanted
    compile_one = server.loaded.grammars.compile
    try:
        return await asyncio.wait_for(
            run_in_threadpool(compile_one, kind, value), COMPILE_TIMEOUT_S
        )
    except InvalidRequest as exc:
        raise ApiError(400, "invalid_request", f"{field}: {exc}", field=field) from None
    except TimeoutError:
        raise ApiError(
            400,
            "invalid_request",
            f"{field}: took longer than {COMPILE_TIMEOUT_S:.0f} s to compile; simplify it",
            field=field,
        ) from None


def _wanted(
    structured: StructuredOutputs | None, response_format: ResponseFormat | None
) -> tuple[str, str, Any] | None:
    """(field, kind, value) of the one constraint asked for."""
    if response_format is not None and response_format.type == "text":
        response_format = None
    if structured is not None and response_format is not None:
        raise ApiError(
            400,
            "invalid_request",
            "structured_outputs: not with response_format; ask for one constraint",
            field="structured_outputs",
        )
    if response_format is not None:
        if response_format.json_schema is not None:
            return "response_format", "json_schema", response_format.json_schema.json_schema
        return "response_format", "json_object", None
    if structured is None:
        return None
    if structured.json_schema is not None:
        return "structured_outputs", "json_schema", structured.json_schema
    if structured.json_object:
        return "structured_outputs", "json_object", None
    if structured.regex is not None:
        return "structured_outputs", "regex", structured.regex
    if structured.choice is not None:
        return "structured_outputs", "choice", structured.choice
    return "structured_outputs", "grammar", structured.grammar
