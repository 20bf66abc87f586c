"""Adapter management: list, inspect, delete (uploads come with the store)."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from server.api.deps import require_admin

router = APIRouter()


@router.get("/adapters")
async def list_adapters(request: Request) -> dict:
    return {"adapters": [a.record() for a in request.app.state.registry.all()]}


@router.get("/adapters/{name}")
async def get_adapter(name: str, request: Request) -> dict:
    return request.app.state.registry.get(name).record()


@router.delete("/adapters/{name}", dependencies=[Depends(require_admin)])
async def delete_adapter(name: str, request: Request) -> dict:
    adapter = request.app.state.registry.remove(name)
    return {"deleted": adapter.name}
