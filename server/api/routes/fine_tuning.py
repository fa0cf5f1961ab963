"""Fine-tuning jobs, OpenAI's `/v1/fine_tuning/jobs`: create, list, get, events, checkpoints,
cancel.

A job trains a prefix on the served model beside serving (server/tuning/) and, once it
succeeds, `fine_tuned_model` is that prefix's reference, servable at once by every generation
route. Another tenant's jobs are 404.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.concurrency import run_in_threadpool

from prefixes.tuning.records import Checkpoint, JobEvent, JobInfo
from server.api.auth import Server, Tenant
from server.api.errors import ApiError
from server.api.query import reject_unknown_query
from server.api.schemas import (
    ERROR_RESPONSES,
    CheckpointList,
    CheckpointObject,
    EventList,
    EventObject,
    HyperparametersIn,
    HyperparametersOut,
    JobCreate,
    JobErrorObject,
    JobList,
    JobObject,
    MethodOut,
    MethodSettingsOut,
)
from server.api.services import Ready
from server.tuning.plan import JobRequest, PlanLimits, plan_job

router = APIRouter(responses=ERROR_RESPONSES, dependencies=[Depends(reject_unknown_query)])


@router.post("/v1/fine_tuning/jobs", response_model=JobObject)
async def create_job(body: JobCreate, server: Server, tenant: Tenant) -> JobObject:
    for field in sorted(body.model_extra or {}):
        raise ApiError(
            400, "invalid_request", f"{field}: not supported by this server", field=field
        )
    spec = await run_in_threadpool(
        plan_job, job_request(body), tenant, plan_limits(server), server.registry, server.tuning
    )
    job = await run_in_threadpool(server.tuning.create_job, tenant, spec)
    server.worker.wake()
    return job_object(job)


def job_request(body: JobCreate) -> JobRequest:
    settings = body.method.settings if body.method else None
    hyper = body.hyperparameters
    if settings is not None and settings.hyperparameters is not None:
        if hyper is not None:
            raise ApiError(
                400, "invalid_request",
                "hyperparameters: send them at the top level or in method, not both",
                field="hyperparameters",
            )  # fmt: skip
        hyper = settings.hyperparameters
    hyper = hyper or HyperparametersIn()
    return JobRequest(
        model=body.model,
        training_file=body.training_file,
        validation_file=body.validation_file,
        method=body.method.type if body.method else None,
        num_virtual_tokens=settings.num_virtual_tokens if settings else None,
        n_epochs=None if hyper.n_epochs == "auto" else hyper.n_epochs,
        batch_size=None if hyper.batch_size == "auto" else hyper.batch_size,
        learning_rate_multiplier=(
            None if hyper.learning_rate_multiplier == "auto" else hyper.learning_rate_multiplier
        ),
        suffix=body.suffix,
        seed=body.seed,
    )


def plan_limits(server: Ready) -> PlanLimits:
    return PlanLimits(
        base_model=server.loaded.model_id,
        max_virtual_tokens=server.settings.max_virtual_tokens,
        max_steps=server.settings.max_training_steps,
        has_tokenizer=server.loaded.tokenizer is not None,
    )


@router.get("/v1/fine_tuning/jobs", response_model=JobList)
async def list_jobs(
    server: Server,
    tenant: Tenant,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: str | None = None,
) -> JobList:
    page = await run_in_threadpool(server.tuning.list_jobs, tenant, limit=limit, after=after)
    return JobList(data=[job_object(job) for job in page.items], has_more=page.has_more)


@router.get("/v1/fine_tuning/jobs/{job_id}", response_model=JobObject)
async def get_job(job_id: str, server: Server, tenant: Tenant) -> JobObject:
    return job_object(await run_in_threadpool(server.tuning.get_job, tenant, job_id))


@router.get("/v1/fine_tuning/jobs/{job_id}/events", response_model=EventList)
async def list_events(
    job_id: str,
    server: Server,
    tenant: Tenant,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    after: str | None = None,
) -> EventList:
    page = await run_in_threadpool(
        server.tuning.list_events, tenant, job_id, limit=limit, after=after
    )
    return EventList(data=[event_object(event) for event in page.items], has_more=page.has_more)


@router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints", response_model=CheckpointList)
async def list_checkpoints(
    job_id: str,
    server: Server,
    tenant: Tenant,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
    after: str | None = None,
) -> CheckpointList:
    """The job's checkpoints, newest first: while it runs, its newest few
    (`--checkpoints-per-job`), which a restart resumes from; once it ended, their steps and
    metrics (their training state is dropped)."""
    job = await run_in_threadpool(server.tuning.get_job, tenant, job_id)
    page = await run_in_threadpool(
        server.worker.checkpoints.listing, tenant, job_id, limit=limit, after=after
    )
    data = [checkpoint_object(job, found) for found in page.items]
    return CheckpointList(
        data=data,
        has_more=page.has_more,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel", response_model=JobObject)
async def cancel_job(job_id: str, server: Server, tenant: Tenant) -> JobObject:
    job = await run_in_threadpool(server.tuning.cancel, tenant, job_id)
    server.worker.interrupt(job_id)
    return job_object(job)


def job_object(job: JobInfo) -> JobObject:
    spec = job.spec
    hyper = HyperparametersOut(
        n_epochs=spec.hyperparameters.n_epochs,
        batch_size=spec.hyperparameters.batch_size,
        learning_rate_multiplier=spec.hyperparameters.learning_rate_multiplier,
    )
    method = spec.method.value
    settings = MethodSettingsOut(num_virtual_tokens=spec.num_virtual_tokens, hyperparameters=hyper)
    error = job.error
    return JobObject(
        id=job.id,
        created_at=int(job.created_at.timestamp()),
        error=JobErrorObject(code=error.code, message=error.message, param=error.param)
        if error
        else None,
        fine_tuned_model=job.fine_tuned_model,
        finished_at=int(job.finished_at.timestamp()) if job.finished_at else None,
        hyperparameters=hyper,
        model=spec.model,
        organization_id=job.owner,
        result_files=[],
        seed=spec.seed,
        status=job.status.value,
        trained_tokens=job.trained_tokens,
        training_file=spec.training_file,
        validation_file=spec.validation_file,
        method=MethodOut.model_validate({"type": method, method: settings}),
        user_provided_suffix=spec.suffix,
    )


def event_object(event: JobEvent) -> EventObject:
    return EventObject(
        id=event.id,
        created_at=int(event.created_at.timestamp()),
        level=event.level,
        message=event.message,
        data=event.data,
        type=event.type,
    )


def checkpoint_object(job: JobInfo, checkpoint: Checkpoint) -> CheckpointObject:
    return CheckpointObject(
        id=checkpoint.id,
        created_at=int(checkpoint.created_at.timestamp()),
        fine_tuned_model_checkpoint=(f"{job.owner}/{job.spec.suffix}:ckpt-step-{checkpoint.step}"),
        fine_tuning_job_id=job.id,
        metrics=checkpoint.metrics,
        step_number=checkpoint.step,
    )
