"""POST /v1/fine_tuning/transferability: which prefix to start a fine-tuning job from.

Candidate prefixes are ranked by their mean loss per target token on a sample of a training
file, beside the base model's, each (candidate, example) pair scored as one row of the
engine's batches (server/api/transferability.py). A candidate the tenant may not use, like a
file it cannot see, is 404 with the same message as a missing one.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from prefixes.catalog.names import parse_ref
from prefixes.errors import InvalidName
from server.api.auth import Server, Tenant
from server.api.errors import ApiError
from server.api.query import reject_unknown_query
from server.api.schemas import (
    ERROR_RESPONSES,
    CandidateScore,
    TransferabilityObject,
    TransferabilityRequest,
)
from server.api.services import Ready
from server.api.transferability import Query, rank_candidates
from server.tuning.transferability import ranked

router = APIRouter(responses=ERROR_RESPONSES, dependencies=[Depends(reject_unknown_query)])


@router.post("/v1/fine_tuning/transferability", response_model=TransferabilityObject)
async def transferability(
    body: TransferabilityRequest, http_request: Request, server: Server, tenant: Tenant
) -> TransferabilityObject:
    query = Query(
        training_file=body.training_file,
        candidates=candidate_refs(server, tenant, body.candidates),
        sample_size=sample_size(server, body.sample_size),
        seed=body.seed,
    )
    ranking = await rank_candidates(server, tenant, query, http_request)
    infos = {info.id: info for info, _ in ranking.candidates}
    data = []
    for scored in ranked([scored for _, scored in ranking.candidates]):
        info = infos[scored.ref or ""]
        data.append(
            CandidateScore(
                prefix=info.id,
                version=info.version,
                kind=info.kind.value,
                num_virtual_tokens=info.num_virtual_tokens,
                loss=scored.loss,
                error=scored.error,
            )
        )
    return TransferabilityObject(
        model=server.loaded.model_id,
        training_file=body.training_file,
        seed=body.seed,
        lines=ranking.lines,
        target_tokens=ranking.target_tokens,
        base_loss=ranking.base.loss,
        data=data,
        truncated=ranking.truncated,
    )


def candidate_refs(server: Ready, tenant: str, refs: list[str] | None) -> tuple[str, ...] | None:
    """Full references (a bare name is the tenant's own), distinct, within the server's bound."""
    if refs is None:
        return None
    bound = server.settings.max_transferability_candidates
    if len(refs) > bound:
        raise ApiError(
            422, "invalid_request",
            f"candidates: expected at most {bound} prefix references "
            f"(--max-transferability-candidates), found {len(refs)}",
            field="candidates",
        )  # fmt: skip
    full = []
    for ref in refs:
        try:
            owner, name = parse_ref(ref, tenant)
        except InvalidName as exc:
            raise ApiError(
                422, "invalid_request", f"candidates: {exc.message}", field="candidates"
            ) from None
        full.append(f"{owner}/{name}")
    twice = sorted({ref for ref in full if full.count(ref) > 1})
    if twice:
        raise ApiError(
            422, "invalid_request", f"candidates: expected distinct prefixes, found {twice[0]} "
            "twice", field="candidates",
        )  # fmt: skip
    return tuple(full)


def sample_size(server: Ready, asked: int | None) -> int:
    bound = server.settings.max_transferability_sample
    if asked is not None and asked > bound:
        raise ApiError(
            422, "invalid_request",
            f"sample_size: expected at most {bound} examples (--max-transferability-sample), "
            f"found {asked}",
            field="sample_size",
        )  # fmt: skip
    return bound if asked is None else asked
