"""GET /v1/usage: what was used, per tenant and model, by hour, day or over the span; JSON or
CSV (docs/api.md). A tenant sees its own; the admin sees every tenant, or one with `tenant=`."""

from __future__ import annotations

import csv
import io
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Response
from fastapi.concurrency import run_in_threadpool

from prefixes.catalog.names import NAME_RULE
from prefixes.storage.schema import USAGE_COUNTS
from prefixes.usage.ledger import DAY, GroupBy
from prefixes.usage.records import HOUR, UsagePage, UsageRow
from server.api.auth import AdminOrTenant, Server
from server.api.errors import ApiError
from server.api.query import reject_unknown_query
from server.api.schemas import ERROR_RESPONSES, UsageReport

router = APIRouter(responses=ERROR_RESPONSES, dependencies=[Depends(reject_unknown_query)])

# Unix seconds a query may name: JSON's exact integers, so no bound overflows a column.
MAX_TIME = 2**53
CSV_COLUMNS = ("start_time", "end_time", "tenant", "model", *USAGE_COUNTS)


@router.get(
    "/v1/usage",
    response_model=UsageReport,
    responses={200: {"content": {"text/csv": {}}, "description": "JSON, or CSV with format=csv"}},
)
async def usage_report(
    server: Server,
    caller: AdminOrTenant,
    start: Annotated[int, Query(ge=0, le=MAX_TIME)] = 0,
    end: Annotated[int | None, Query(ge=0, le=MAX_TIME)] = None,
    group_by: Literal["prefix", "day", "hour"] = "prefix",  # prefixes.usage.ledger.GroupBy
    tenant: Annotated[str | None, Query(pattern=NAME_RULE)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: str | None = None,
    format: Literal["json", "csv"] = "json",
) -> Any:
    if tenant is not None:
        caller.require_access(tenant)
    who = caller.tenant if caller.tenant is not None else tenant
    # Whole hours: the hour `start` falls in, up to the end of the hour `end` falls in.
    first = start // HOUR * HOUR
    last = -(-(int(time.time()) + 1 if end is None else end) // HOUR) * HOUR
    if last <= first:
        raise ApiError(
            422, "invalid_request", f"end: expected after start ({start}), found {end}",
            field="end",
        )  # fmt: skip
    page = await run_in_threadpool(
        server.usage_ledger.report,
        tenant=who,
        start=first,
        end=last,
        group_by=GroupBy(group_by),
        limit=limit,
        cursor=cursor,
    )
    span = {"prefix": last - first, "day": DAY, "hour": HOUR}[group_by]
    if format == "csv":
        return csv_response(page, span)
    return {
        "object": "list",
        "group_by": group_by,
        "start_time": first,
        "end_time": last,
        "data": [row_object(row, span) for row in page.rows],
        "next": page.next_cursor,
    }


def row_object(row: UsageRow, span: int) -> dict[str, Any]:
    return {
        "start_time": row.start,
        "end_time": row.start + span,
        "tenant": row.tenant,
        "model": row.model or None,
        **row.counts.as_dict(),
    }


def csv_response(page: UsagePage, span: int) -> Response:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in page.rows:
        values = row_object(row, span)
        writer.writerow(["" if values[c] is None else values[c] for c in CSV_COLUMNS])
    headers = {"X-Next-Cursor": page.next_cursor} if page.next_cursor else None
    return Response(out.getvalue(), media_type="text/csv", headers=headers)
