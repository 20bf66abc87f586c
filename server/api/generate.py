"""`POST /generate?adapter=NAME`: the native API, JSON or server-sent events."""
from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from server.api.deps import require_api_key
from server.api.generation import Generation, Item, Job, Outcome
from server.api.schemas import GenerateBody
from server.api.sse import EventStream, stream_response
from server.errors import InvalidRequestError

router = APIRouter(dependencies=[Depends(require_api_key)])


@router.post("/generate")
async def generate(body: GenerateBody, request: Request, adapter: str | None = None):
    gen: Generation = request.app.state.generation
    if adapter and body.adapters is not None:
        raise InvalidRequestError(f"adapters: expected either ?adapter=NAME or an `adapters` list in the body, got "
                                  f"both (?adapter={adapter})")
    if unknown := [key for key in request.query_params if key != "adapter"]:
        raise InvalidRequestError(f"{unknown[0]}: expected only ?adapter=NAME in the query (every other field "
                                  f"goes in the JSON body), got ?{unknown[0]}={request.query_params[unknown[0]]}")
    if len(asked := request.query_params.getlist("adapter")) > 1:
        raise InvalidRequestError(f"adapter: expected one ?adapter=NAME, got {len(asked)}: {asked[:4]}")
    ids = await gen.tokenize(body.prompt, body.prompt_token_ids)
    job = await gen.job(body.parts() or adapter or None, ids, body.params(body.max_new_tokens), body.mode)
    if body.stream:
        return await _sse(gen, job, request.url.path)
    return JSONResponse(_response(job, await gen.run(job)))


def _response(job: Job, out: Outcome) -> dict:
    return {
        "text": out.text,
        "token_ids": out.token_ids,
        "adapter": job.adapter.name if job.adapter else None,
        "kind": job.kind,
        "mode": job.mode,
        "finish_reason": out.finish_reason,
        "usage": {"prompt_tokens": job.prompt_tokens, "completion_tokens": len(out.token_ids),
                  "prompt_tokens_details": {"cached_tokens": out.cached_tokens}},
    }


async def _sse(gen: Generation, job: Job, path: str) -> EventStream:
    """One event per token, then one with the whole response; refusals come before the 200."""
    first, rest = await gen.start(job)

    def render(item: Item) -> str:
        token_id, delta, out = item
        if token_id is None:  # text held back for a stop string that never came ends the token events
            tail = f"data: {json.dumps({'token_id': None, 'text': delta})}\n\n" if delta else ""
            return tail + f"data: {json.dumps(_response(job, out))}\n\n"
        return f"data: {json.dumps({'token_id': token_id, 'text': delta})}\n\n"

    return stream_response(first, rest, render, path)
