"""`GET /health` (the process answers), `GET /ready` (model loaded and warm), `GET /metrics`.

The probes answer HEAD too (the status without the body), as load balancers' health checks may ask."""
from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

router = APIRouter()


@router.api_route("/health", methods=["GET", "HEAD"])
async def health() -> dict:
    return {"status": "ok"}


@router.api_route("/ready", methods=["GET", "HEAD"])
async def ready(request: Request) -> JSONResponse:
    engine = request.app.state.engine
    if engine.ready.is_set() and not request.app.state.draining:
        return JSONResponse({"status": "ready", "model": request.app.state.base.name})
    return JSONResponse({"status": "starting" if not engine.ready.is_set() else "draining"}, status_code=503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    body, content_type = request.app.state.metrics.render()
    return Response(body, media_type=content_type)
