"""POST /v1/generate: the native generation endpoint (token ids in the response)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from prefixes.catalog.ensembles import EnsembleMethod, member_refs
from server.api.auth import Server, Tenant
from server.api.constraints import constraint_of
from server.api.errors import ApiError
from server.api.generation import (
    Ensemble,
    Job,
    respond,
    sampling_params,
    tokenize,
    with_stored_ensemble,
)
from server.api.logprob_shapes import native, scored_output, scored_prompt
from server.api.query import reject_unknown_query
from server.api.schemas import (
    ERROR_RESPONSES,
    STREAM_RESPONSE,
    Candidate,
    EnsembleOutcome,
    GenerateRequest,
    GenerateResponse,
    TokenLogprob,
    Usage,
)
from server.api.services import Ready
from server.api.voting import VotedResult
from server.engine.request import SamplingParams
from server.engine.stream import Chunk, RequestStream, Result

router = APIRouter(responses=ERROR_RESPONSES, dependencies=[Depends(reject_unknown_query)])


def new_tokens_of(server: Server, body: GenerateRequest) -> int:
    """As asked; unset, the field's default within this server's limit."""
    if "max_new_tokens" in body.model_fields_set:
        return body.max_new_tokens
    return min(body.max_new_tokens, server.settings.max_new_tokens_limit)


@router.post(
    "/v1/generate",
    response_model=GenerateResponse,
    response_model_exclude_none=True,  # `ensemble` only for ensembles, and only what applies
    responses=STREAM_RESPONSE,
)
async def generate(
    body: GenerateRequest, http_request: Request, server: Server, tenant: Tenant
) -> GenerateResponse | StreamingResponse:
    if body.max_new_tokens == 0 and body.prompt_logprobs is None:
        raise ApiError(
            400,
            "invalid_request",
            "max_new_tokens: 0 generates nothing; it only scores the prompt, with prompt_logprobs",
            field="max_new_tokens",
        )
    grammar = await constraint_of(server, body)
    sampling = sampling_params(
        server,
        body,
        grammar=grammar,
        max_new_tokens=new_tokens_of(server, body),
        ignore_eos=body.ignore_eos,
        logprobs=body.logprobs,
        prompt_logprobs=body.prompt_logprobs,
    )
    prompt = await tokenize(server, body.prompt)
    job = Job([prompt], body.prefix, sampling, body.stream, ensemble_of(server, tenant, body))
    job = await with_stored_ensemble(server, tenant, job)
    encoder = NativeEncoder(job.ensemble, prompt, sampling)
    response: GenerateResponse | StreamingResponse = await respond(
        server, tenant, job, encoder, http_request
    )
    return response


def ensemble_of(server: Ready, tenant: str, body: GenerateRequest) -> Ensemble | None:
    """The ensemble `prefixes` and `ensemble` ask for, checked; None for a single prefix."""
    if body.prefixes is None:
        if body.ensemble is not None:
            raise ApiError(
                400,
                "invalid_request",
                "ensemble: combines the members of 'prefixes'; none were given (a stored "
                "ensemble, named in 'prefix', has its own method)",
                field="ensemble",
            )
        return None
    if body.prefix is not None:
        raise ApiError(
            400,
            "invalid_request",
            "prefix: give either 'prefix' or 'prefixes' (an ensemble), not both",
            field="prefix",
        )
    members = member_refs(body.prefixes, tenant, server.settings.max_ensemble_members)
    return Ensemble(members, EnsembleMethod(body.ensemble or EnsembleMethod.VOTE))


def usage(prompt_tokens: int, prefix_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        prefix_tokens=prefix_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


class NativeEncoder:
    def __init__(
        self, ensemble: Ensemble | None, prompt: list[int], sampling: SamplingParams
    ) -> None:
        self.generated = 0
        self.ensemble = ensemble
        self.prompt = prompt
        self.logprobs = sampling.logprobs is not None
        self.prompt_logprobs = sampling.prompt_logprobs is not None
        self.started = False  # a chunk was sent: the prompt's log-probs went with the first

    def result(self, results: list[Result]) -> GenerateResponse:
        (result,) = results
        response = GenerateResponse(
            text=result.text,
            token_ids=result.token_ids,
            finish_reason=result.finish_reason,
            usage=usage(result.prompt_tokens, result.prefix_tokens, len(result.token_ids)),
            ensemble=self._outcome(result),
        )
        if self.logprobs:
            entries = native(scored_output(result.token_ids, result.logprobs))
            response.logprobs = [TokenLogprob.model_validate(e) for e in entries]
        if self.prompt_logprobs:
            entries = native(scored_prompt(self.prompt, result.prompt_logprobs))
            response.prompt_logprobs = [
                None if e is None else TokenLogprob.model_validate(e) for e in entries
            ]
        return response

    def _outcome(self, result: Result) -> EnsembleOutcome | None:
        ensemble = self.ensemble
        if ensemble is None:
            return None
        outcome = EnsembleOutcome(
            method=ensemble.method.value, members=list(ensemble.members), ensemble=ensemble.stored
        )
        vote = result.vote if isinstance(result, VotedResult) else None
        if vote is not None:
            outcome.candidates = [
                Candidate(
                    prefix=c.prefix,
                    text=c.result.text,
                    token_ids=c.result.token_ids,
                    finish_reason=c.result.finish_reason,
                    mean_logprob=c.mean_logprob,
                )
                for c in vote.candidates
            ]
            outcome.votes = vote.counts
        return outcome

    def opening(self, choices: int) -> list[dict[str, Any]]:
        return []

    def closing(self, streams: list[RequestStream]) -> list[dict[str, Any]]:
        return []  # the last chunk carries the usage

    def chunk(self, chunk: Chunk, stream: RequestStream, index: int) -> dict[str, Any]:
        first, self.started = not self.started, True
        self.generated += len(chunk.token_ids)
        event: dict[str, Any] = {
            "text": chunk.text,
            "token_ids": chunk.token_ids,
            "finish_reason": chunk.finish_reason,
        }
        if self.logprobs:
            event["logprobs"] = native(scored_output(chunk.token_ids, chunk.logprobs))
        if self.prompt_logprobs and first:
            event["prompt_logprobs"] = native(scored_prompt(self.prompt, stream.prompt_logprobs))
        if chunk.finish_reason is not None:
            counts = (stream.prompt_tokens, stream.prefix_tokens, self.generated)
            event["usage"] = usage(*counts).model_dump()
        return event
