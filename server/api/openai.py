"""OpenAI-compatible endpoints: `model` is an adapter name or the base model's name."""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.api.deps import require_api_key, synced_store
from server.api.generation import Generation, Job, Outcome
from server.api.logprobs import legacy_logprobs
from server.api.schemas import ChatBody, ChatMessage, CompletionBody
from server.errors import InvalidRequestError

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])

@router.get("/models", dependencies=[Depends(synced_store)])
async def models(request: Request) -> dict:
    base = request.app.state.base
    created = int(request.app.state.started_at)
    data = [{"id": base.name, "object": "model", "created": created, "owned_by": "hotswap", "parent": None}]
    for a in request.app.state.registry.all():
        data.append({"id": a.name, "object": "model", "created": int(a.created_at), "owned_by": "hotswap",
                     "parent": base.name, "kind": a.kind})
    return {"object": "list", "data": data}


@router.post("/completions")
async def completions(body: CompletionBody, request: Request):
    _check_scoring(body)
    gen: Generation = request.app.state.generation
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        raise InvalidRequestError(f"prompt: expected one string or one list of token ids, got a batch of {len(prompt)}")
    ids = gen.tokenize(None, prompt) if isinstance(prompt, list) else gen.tokenize(prompt, None)
    job = await gen.job(_adapter_of(request, body.model), ids, body.params(body.max_tokens), None)
    if body.stream:
        return await _answer(gen, job, body.model, stream=True, chat=False)
    return await _scored_completion(gen, job, body)


def _check_scoring(body: CompletionBody) -> None:
    if body.max_tokens == 0 and not body.echo:
        raise InvalidRequestError("max_tokens: expected at least 1 (0 only with echo: true, to score the prompt), got 0")
    if body.stream and (body.echo or body.logprobs is not None):
        raise InvalidRequestError("stream: expected false with echo or logprobs (scores are not streamed), got true")


async def _scored_completion(gen: Generation, job: Job, body: CompletionBody) -> JSONResponse:
    """A non-streamed completion; with echo the text starts with the prompt, with logprobs it carries scores."""
    rid = f"cmpl-{uuid.uuid4().hex[:24]}"
    out = await gen.run(job)
    choice = _choice(out.text, out.finish_reason, chat=False)
    if body.echo:
        prompt = body.prompt if isinstance(body.prompt, str) else gen.base.tokenizer.decode(job.prompt_ids)
        choice["text"] = prompt + out.text
    if body.logprobs is not None:
        choice["logprobs"] = legacy_logprobs(gen.base.tokenizer, job.prompt_ids, out, body.echo)
    return JSONResponse(_envelope(rid, body.model, False, [choice], _usage(job, out)))


@router.post("/chat/completions")
async def chat_completions(body: ChatBody, request: Request):
    gen: Generation = request.app.state.generation
    ids = gen.tokenize(None, _chat_ids(gen, body.messages))
    job = await gen.job(_adapter_of(request, body.model), ids, body.params(body.limit(256)), None)
    return await _answer(gen, job, body.model, body.stream, chat=True)


def _adapter_of(request: Request, model: str) -> str | None:
    return None if model == request.app.state.base.name else model


def _chat_ids(gen: Generation, messages: list[ChatMessage]) -> list[int]:
    """The tokenizer's chat template, else plain '<role>: <content>' lines and 'assistant:'."""
    tok = gen.base.tokenizer
    turns = [{"role": m.role, "content": m.text()} for m in messages]
    if tok.chat_template:
        return list(tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=True, return_dict=False))
    text = "".join(f"{t['role']}: {t['content']}\n" for t in turns) + "assistant:"
    return tok.encode(text, add_special_tokens=False)


async def _answer(gen: Generation, job: Job, model: str, stream: bool, chat: bool):
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    if stream:
        return StreamingResponse(_sse(gen, job, model, rid, chat), media_type="text/event-stream")
    out = await gen.run(job)
    return JSONResponse(_envelope(rid, model, chat, [_choice(out.text, out.finish_reason, chat)], _usage(job, out)))


def _choice(text: str, finish_reason: str | None, chat: bool, delta: bool = False) -> dict:
    if not chat:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    key = "delta" if delta else "message"
    message = {"role": "assistant", "content": text} if not delta or text else {}
    return {"index": 0, key: message, "logprobs": None, "finish_reason": finish_reason}


def _usage(job: Job, out: Outcome) -> dict:
    n_in, n_out = len(job.prompt_ids), len(out.token_ids)
    return {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}


def _envelope(rid: str, model: str, chat: bool, choices: list[dict], usage: dict | None, chunk: bool = False) -> dict:
    kind = "chat.completion" if chat else "text_completion"
    body = {"id": rid, "object": f"{kind}.chunk" if chunk and chat else kind, "created": int(time.time()),
            "model": model, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body


async def _sse(gen: Generation, job: Job, model: str, rid: str, chat: bool) -> AsyncIterator[str]:
    async for token_id, delta, out in gen.stream(job):
        final = token_id is None
        choice = _choice(delta, out.finish_reason if final else None, chat, delta=True)
        usage = _usage(job, out) if final else None
        yield f"data: {json.dumps(_envelope(rid, model, chat, [choice], usage, chunk=True))}\n\n"
    yield "data: [DONE]\n\n"
