"""Query parameters a route does not take are refused, never silently ignored."""

from __future__ import annotations

from fastapi import Request
from fastapi.routing import APIRoute

from server.api.errors import ApiError


def reject_unknown_query(request: Request) -> None:
    """A router dependency: 400 naming the first query parameter the route does not declare."""
    route = request.scope.get("route")
    known = (
        {p.alias for p in route.dependant.query_params} if isinstance(route, APIRoute) else set()
    )
    for name in request.query_params:
        if name not in known:
            raise ApiError(
                400, "invalid_request", f"{name}: not a parameter of this route", field=name
            )
