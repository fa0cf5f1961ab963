"""Fine-tuning checkpoints in the database: the SQL over `tuning_checkpoints`, run in the
caller's transaction. A row names its tensors' file by sha256; the file is written and made
durable before the row commits."""

from __future__ import annotations

import json
import time
from typing import Any

from sqlalchemy import Connection, Row, delete, insert, select

from prefixes.catalog.records import timestamp
from prefixes.storage.schema import parse_seq, tuning_checkpoints
from prefixes.tuning.records import Checkpoint

CHECKPOINT_PREFIX = "ftckpt-"


def add(
    connection: Connection,
    job_id: str,
    step: int,
    metrics: dict[str, Any],
    state: dict[str, Any],
    sha256: str,
    size: int,
) -> None:
    connection.execute(
        insert(tuning_checkpoints).values(
            job_id=job_id,
            step=step,
            created_at=time.time(),
            metrics=json.dumps(metrics),
            state=json.dumps(state),
            sha256=sha256,
            bytes=size,
        )
    )


def newest(connection: Connection, job_id: str, limit: int, before: int | None) -> list[Row[Any]]:
    """Up to `limit` of the job's checkpoints, newest first, older than `before` (a seq)."""
    query = select(tuning_checkpoints).where(tuning_checkpoints.c.job_id == job_id)
    if before is not None:
        query = query.where(tuning_checkpoints.c.seq < before)
    return list(connection.execute(query.order_by(tuning_checkpoints.c.seq.desc()).limit(limit)))


def trim(connection: Connection, job_id: str, keep: int) -> list[str]:
    """Delete all but the job's `keep` newest checkpoints; return the digests of their files
    that no remaining checkpoint of the job names."""
    kept = newest(connection, job_id, keep, None)
    if not kept:
        return []
    oldest_kept = kept[-1].seq
    stale = tuning_checkpoints.c.job_id == job_id
    stale = stale & (tuning_checkpoints.c.seq < oldest_kept)
    dropped = set(connection.execute(select(tuning_checkpoints.c.sha256).where(stale)).scalars())
    connection.execute(delete(tuning_checkpoints).where(stale))
    return sorted(dropped - {row.sha256 for row in kept})


def seq_of(checkpoint_id: str) -> int | None:
    if not checkpoint_id.startswith(CHECKPOINT_PREFIX):
        return None
    return parse_seq(checkpoint_id.removeprefix(CHECKPOINT_PREFIX))


def checkpoint(found: Row[Any]) -> Checkpoint:
    return Checkpoint(
        id=f"{CHECKPOINT_PREFIX}{found.seq}",
        job_id=found.job_id,
        step=found.step,
        created_at=timestamp(found.created_at),
        metrics=json.loads(found.metrics),
        state=json.loads(found.state),
        sha256=found.sha256,
        bytes=found.bytes,
    )
