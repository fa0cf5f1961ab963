"""What the fine-tuning side of the registry hands out: training files, jobs and their events,
as plain frozen dataclasses (the HTTP layer shapes them into OpenAI's objects)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

from prefixes.formats.kinds import PrefixKind

T = TypeVar("T")

FILE_PURPOSE = "fine-tune"  # the one purpose a training file may have


class JobStatus(enum.StrEnum):
    VALIDATING_FILES = "validating_files"  # created; its files are read against the model next
    QUEUED = "queued"  # valid, waiting for a training slot (one per tenant, a cap in all)
    RUNNING = "running"
    SUCCEEDED = "succeeded"  # its prefix is registered: committed in the same transaction
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def active(self) -> bool:
        return self in (JobStatus.VALIDATING_FILES, JobStatus.QUEUED, JobStatus.RUNNING)


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-tenant bounds of the fine-tuning side (server settings, the same for every tenant)."""

    max_files: int = 100
    max_file_bytes: int = 256 << 20  # all of a tenant's training files together
    max_active_jobs: int = 16  # validating, queued or running


@dataclass(frozen=True, slots=True)
class FileInfo:
    id: str
    owner: str
    filename: str
    purpose: str
    bytes: int
    num_examples: int
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Hyperparameters:
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float


@dataclass(frozen=True, slots=True)
class JobSpec:
    """What a job trains, every default resolved (so a job reads the same after a restart)."""

    model: str  # the base model's id, or the prefix reference training starts from
    training_file: str
    validation_file: str | None
    method: PrefixKind  # PREFIX_TUNING or PROMPT_TUNING
    num_virtual_tokens: int
    hyperparameters: Hyperparameters
    suffix: str  # the name of the prefix a successful job registers
    seed: int


@dataclass(frozen=True, slots=True)
class JobError:
    code: str
    message: str
    param: str | None = None


@dataclass(frozen=True, slots=True)
class JobInfo:
    id: str
    owner: str
    spec: JobSpec
    status: JobStatus
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    fine_tuned_model: str | None  # `owner/suffix` once succeeded
    trained_tokens: int | None
    error: JobError | None


@dataclass(frozen=True, slots=True)
class JobEvent:
    id: str
    job_id: str
    created_at: datetime
    level: str  # info, warn, error
    type: str  # message, metrics
    message: str
    data: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class Listing(Generic[T]):
    """A page of a listing, newest first; `has_more`: pass the last item's id as `after`."""

    items: list[T]
    has_more: bool


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A running job's training state at the end of a step: `state` (JSON: the step, epoch,
    tokens trained...) here, its tensors in the file `sha256` of the checkpoint store."""

    id: str
    job_id: str
    step: int
    created_at: datetime
    metrics: dict[str, Any]  # the step's metrics event: train_loss, valid_loss...
    state: dict[str, Any]
    sha256: str
    bytes: int
