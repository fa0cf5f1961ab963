"""GET /health (no auth): 200 once the model is loaded and the engine runs, 503 before."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from server.api.errors import error_response
from server.api.schemas import ERROR_RESPONSES
from server.api.services import Services, services

router = APIRouter(responses={503: ERROR_RESPONSES[503]})


@router.get("/health")
async def health(state: Annotated[Services, Depends(services)]) -> JSONResponse:
    if state.ready and state.engine is not None and state.engine.alive:
        return JSONResponse({"status": "ok", "model": state.model_id})
    if state.startup_error:
        return error_response(503, "unavailable", f"startup failed: {state.startup_error}")
    return error_response(503, "unavailable", "starting: the model is loading")
