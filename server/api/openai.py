"""OpenAI-compatible endpoints: `model` is an adapter name or the base model's name.

Without a chat template (chat_prompt.py), the reply is the generated text without its leading
whitespace. Chat without `max_tokens` may
generate to the end of the context (as vLLM), at most --max-new-tokens-limit tokens; completions
default to 16 (OpenAI's default). Scores (`logprobs`, `echo`) are not streamed.
"""
from __future__ import annotations

import asyncio
import uuid

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from server.api import openai_format as fmt
from server.api.chat_prompt import chat_prompt_ids
from server.api.choices import Choice, open_choices, run_choices, stream_choices
from server.api.deps import require_api_key, synced_store
from server.api.generation import Generation, Outcome
from server.api.logprobs import chat_logprobs, legacy_logprobs
from server.api.models import card, default_max_tokens, entry_of, selection_of
from server.api.openai_schemas import ChatRequest, CompletionRequest
from server.api.sse import EventStream, stream_response
from server.errors import InvalidRequestError

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


@router.get("/models", dependencies=[Depends(synced_store)])
async def models(request: Request) -> dict:
    app = request.app
    return {"object": "list", "data": [card(app, None), *(card(app, e) for e in app.state.registry.all())]}


@router.get("/models/{model_id:path}", dependencies=[Depends(synced_store)])
async def model(model_id: str, request: Request) -> dict:
    return card(request.app, entry_of(request.app, model_id))


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request):
    _check_completion(body)
    gen: Generation = request.app.state.generation
    prompts = [await (gen.tokenize(p, None) if isinstance(p, str) else gen.tokenize(None, p, ids_field="prompt"))
               for p in body.prompts()]
    params = body.params(body.max_tokens)
    selection = selection_of(request.app, body.model, body.parts())
    choices = await open_choices(gen, selection, prompts, body.n, params, body.mode, "max_tokens")
    rid, model = f"cmpl-{uuid.uuid4().hex[:24]}", _model(body.model, choices)
    if body.stream:
        return await _stream(gen, choices, fmt.Chunks(rid, model, False, body.include_usage), request.url.path,
                             strip=False)
    outs = await run_choices(gen, choices)
    texts = [_completion_choice(gen, body, c, o) for c, o in zip(choices, outs)]
    return JSONResponse({**fmt.envelope(rid, model, False, texts), "usage": fmt.usage(choices, outs)})


def _model(model: str, choices: list[Choice]) -> str:
    """The response's `model`: the adapter or combination that ran (an `adapters` list of one at
    weight 1 runs that adapter), else the base model asked for."""
    adapter = choices[0].job.adapter
    return model if adapter is None else adapter.name


def _check_completion(body: CompletionRequest) -> None:
    if not body.prompts():
        raise InvalidRequestError("prompt: expected a string, a list of token ids, or a non-empty batch of them, got []")
    if body.max_tokens == 0 and not body.echo:
        raise InvalidRequestError("max_tokens: expected at least 1 (0 only with echo: true, to score the prompt), got 0")
    if body.stream and (body.echo or body.logprobs is not None):
        raise InvalidRequestError("stream: expected false with echo or logprobs (scores are not streamed), got true")


def _completion_choice(gen: Generation, body: CompletionRequest, c: Choice, out: Outcome) -> dict:
    """With echo the text starts with the prompt; with logprobs it carries scores."""
    echoed = None
    if body.echo:
        prompt = body.prompts()[c.prompt]
        echoed = prompt if isinstance(prompt, str) else gen.base.tokenizer.decode(c.job.prompt_ids)
    lp = legacy_logprobs(gen.base.tokenizer, c.job.prompt_ids, out, echoed) if body.logprobs is not None else None
    return fmt.text_choice(c.index, (echoed or "") + out.text, out.finish_reason, lp)


@router.post("/chat/completions")
async def chat_completions(body: ChatRequest, request: Request):
    if body.stream and body.logprobs:
        raise InvalidRequestError("stream: expected false with logprobs (scores are not streamed), got true")
    gen: Generation = request.app.state.generation
    gen.check_turns(body.messages)
    ids, templated = await asyncio.to_thread(chat_prompt_ids, gen.base.tokenizer, body.messages)
    ids = await gen.tokenize(None, ids)
    selection = selection_of(request.app, body.model, body.parts())
    params = body.params(body.limit(default_max_tokens(request.app, selection, ids)))
    choices = await open_choices(gen, selection, [ids], body.n, params, body.mode, body.limit_name)
    rid, model = f"chatcmpl-{uuid.uuid4().hex[:24]}", _model(body.model, choices)
    if body.stream:
        return await _stream(gen, choices, fmt.Chunks(rid, model, True, body.include_usage), request.url.path,
                             strip=not templated)
    outs = await run_choices(gen, choices)
    replies = [_chat_choice(gen, body, c, o, templated) for c, o in zip(choices, outs)]
    return JSONResponse({**fmt.envelope(rid, model, True, replies), "usage": fmt.usage(choices, outs)})


def _chat_choice(gen: Generation, body: ChatRequest, c: Choice, out: Outcome, templated: bool) -> dict:
    lp = chat_logprobs(gen.base.tokenizer, out, strip=not templated) if body.logprobs else None
    return fmt.chat_choice(c.index, out.text if templated else out.text.lstrip(), out.finish_reason, lp)


async def _stream(gen: Generation, choices: list[Choice], chunks: fmt.Chunks, path: str, strip: bool) -> EventStream:
    """Every choice's chunks as they come; a refusal (before the first token) is answered before any header."""
    items = stream_choices(gen, choices)
    first = await anext(items)  # a failed anext has already finalized `items`
    return stream_response(first, items, fmt.StreamRenderer(chunks, choices, strip), path, end=fmt.DONE)
