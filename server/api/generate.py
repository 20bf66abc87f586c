"""`POST /generate?adapter=NAME`: the native API, JSON or server-sent events."""
from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.api.deps import require_api_key
from server.api.generation import Generation, Job, Outcome
from server.api.schemas import GenerateBody

router = APIRouter(dependencies=[Depends(require_api_key)])


@router.post("/generate")
async def generate(body: GenerateBody, request: Request, adapter: str | None = None):
    gen: Generation = request.app.state.generation
    ids = gen.tokenize(body.prompt, body.prompt_token_ids)
    job = await gen.job(adapter or None, ids, body.params(body.max_new_tokens), body.mode)
    if body.stream:
        return StreamingResponse(_sse(gen, job), media_type="text/event-stream")
    return JSONResponse(_response(job, await gen.run(job)))


def _response(job: Job, out: Outcome) -> dict:
    return {
        "text": out.text,
        "token_ids": out.token_ids,
        "adapter": job.adapter.name if job.adapter else None,
        "kind": job.kind,
        "mode": job.mode,
        "finish_reason": out.finish_reason,
        "usage": {"prompt_tokens": len(job.prompt_ids), "completion_tokens": len(out.token_ids)},
    }


async def _sse(gen: Generation, job: Job) -> AsyncIterator[str]:
    async for token_id, delta, out in gen.stream(job):
        if token_id is None:
            yield f"data: {json.dumps(_response(job, out))}\n\n"
        else:
            yield f"data: {json.dumps({'token_id': token_id, 'text': delta})}\n\n"
