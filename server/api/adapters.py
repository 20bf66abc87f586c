"""Adapter management: upload, list, inspect, delete, pin; vLLM's load/unload for folders on the server's disk.

Routers stay thin: the multipart body is streamed to disk by server/upload.py and everything heavy
(unpacking, normalising, validating against the base model, the atomic store write) runs in a
worker thread, so the event loop keeps serving tokens during an upload.
"""
from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from server.adapters.registry import Registry
from server.api.deps import require_admin, require_api_key, synced_store
from server.errors import AdapterNotFoundError, ForbiddenError, InvalidRequestError, clip
from server.store import check_name
from server.upload import receive, unpack

router = APIRouter()
# The token first (docs/auth.md: records are the api key's to read), then a shared store is re-read.
admin = [Depends(require_admin), Depends(synced_store)]
reader = [Depends(require_api_key), Depends(synced_store)]


def _registry(request: Request) -> Registry:
    return request.app.state.registry


@router.get("/adapters", dependencies=reader)
async def list_adapters(request: Request) -> dict:
    return {"adapters": [e.record() for e in _registry(request).all()]}


@router.get("/adapters/{name}", dependencies=reader)
async def get_adapter(name: str, request: Request) -> dict:
    return _registry(request).get(name).record()


@router.post("/adapters", status_code=201, dependencies=admin)
async def upload_adapter(request: Request, replace: bool = False) -> JSONResponse:
    """multipart/form-data: `name`, optional `default_mode`, then `files` parts or one `archive` part."""
    registry = _registry(request)
    limit = request.app.state.settings.max_upload_bytes
    staging = await asyncio.to_thread(registry.store.staging)
    try:
        form = await receive(request, staging, limit)
        name = check_name(form.fields.get("name"))
        if form.archive is not None:
            folder = await asyncio.to_thread(unpack, form.archive, staging / "unpacked", limit)
        elif form.folder is not None:
            folder = form.folder
        else:
            raise InvalidRequestError("form: expected `files` parts or one `archive` part, got neither")
        entry = await asyncio.to_thread(registry.register, name, folder, staging,
                                        default_mode=form.fields.get("default_mode") or None, replace=replace)
    finally:
        await asyncio.to_thread(registry.store.discard, staging)
    if entry.pinned:  # a replaced pinned adapter stays pinned: load the new version now
        try:
            entry = await registry.pin(name)
        except AdapterNotFoundError:
            pass  # deleted since it was registered: the upload committed, the delete came after it
    return JSONResponse(entry.record(), status_code=201)


@router.delete("/adapters/{name}", dependencies=admin)
async def delete_adapter(name: str, request: Request) -> dict:
    await asyncio.to_thread(_registry(request).unregister, name)
    return {"deleted": name}


@router.post("/adapters/{name}/pin", dependencies=admin)
async def pin_adapter(name: str, request: Request) -> dict:
    return (await _registry(request).pin(name, True)).record()


@router.delete("/adapters/{name}/pin", dependencies=admin)
async def unpin_adapter(name: str, request: Request) -> dict:
    return (await _registry(request).pin(name, False)).record()


# ---------------------------------------------------------------- vLLM compatibility


class LoadLoraBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str
    lora_path: str
    load_inplace: bool = False  # vLLM's flag: replace an adapter of that name


class UnloadLoraBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str


@router.post("/v1/load_lora_adapter", dependencies=admin)
async def load_lora_adapter(body: LoadLoraBody, request: Request) -> dict:
    """Register a folder under --allowed-local-dir (any adapter kind); a copy goes into the store."""
    name = check_name(body.lora_name)
    folder = _allowed_folder(request.app.state.settings.allowed_local_dir, body.lora_path)
    entry = await asyncio.to_thread(_registry(request).import_folder, name, folder,
                                    source=f"local:{folder}", replace=body.load_inplace)
    return entry.record()


@router.post("/v1/unload_lora_adapter", dependencies=admin)
async def unload_lora_adapter(body: UnloadLoraBody, request: Request) -> dict:
    await asyncio.to_thread(_registry(request).unregister, body.lora_name)
    return {"deleted": body.lora_name}


def _allowed_folder(allowed: Path | None, given: str) -> Path:
    """`given` resolved (links followed) and required to lie inside `allowed`."""
    if allowed is None:
        raise ForbiddenError("lora_path: loading from the server's disk is off (start with --allowed-local-dir DIR)")
    if not given or "\0" in given:
        raise InvalidRequestError(f"lora_path: expected a folder path, got {given!r}")
    root = allowed.resolve()
    path = (root / given).resolve()  # an absolute `given` replaces root
    if not path.is_relative_to(root):
        raise ForbiddenError(f"lora_path: expected a folder inside --allowed-local-dir (a path relative to it), "
                             f"got {clip(given)}")  # the server's own folder is not shown to clients
    if not path.is_dir():
        raise InvalidRequestError(f"lora_path: expected an adapter folder, got {'a file' if path.exists() else 'no such path'}: {given!r}")
    return path
