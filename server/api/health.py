"""`GET /health` (the process answers), `GET /ready` (model loaded and warm), `GET /metrics`.

The probes answer HEAD too (the status without the body), as load balancers' health checks may ask;
their HEAD routes stay out of the OpenAPI schema, which would list each operation twice."""
from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

router = APIRouter()


@router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    engine = request.app.state.engine
    if engine.ready.is_set() and not request.app.state.draining:
        return JSONResponse({"status": "ready", "model": request.app.state.base.name})
    return JSONResponse({"status": "starting" if not engine.ready.is_set() else "draining"}, status_code=503)


for probe in (health, ready):
    router.add_api_route(f"/{probe.__name__}", probe, methods=["HEAD"], include_in_schema=False)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    body, content_type = request.app.state.metrics.render()
    return Response(body, media_type=content_type)
