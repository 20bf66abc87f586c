"""vLLM's `POST /tokenize` and `POST /detokenize`, with vLLM's request and response bodies.

`/tokenize` takes a `prompt` (with `add_special_tokens`, default true) or chat `messages` (the chat
prompt the chat endpoint would build; `add_generation_prompt`, default true) and answers
`{"count", "max_model_len", "tokens", "token_strs"}`; `model` (optional) picks the model card
whose `max_model_len` is reported. Text that no tokenization could fit in the context is refused
before it is tokenized, as the generation routes refuse it. `/detokenize` takes `tokens` and
answers `{"prompt"}`.
"""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from server.api.chat_prompt import chat_prompt_ids
from server.api.deps import require_api_key
from server.api.models import entry_of, max_model_len
from server.api.openai_schemas import NullIsAbsent
from server.api.schemas import ChatMessage, encodable
from server.errors import InvalidRequestError

router = APIRouter(dependencies=[Depends(require_api_key)])


class TokenizeBody(NullIsAbsent):
    model_config = ConfigDict(extra="ignore", strict=True)  # "yes" is no bool, as on every route

    _utf8 = field_validator("prompt")(encodable)

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = None  # vLLM: true for a prompt, false for messages
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeBody":
        if (self.prompt is None) == (self.messages is None):
            got = "both" if self.prompt is not None else "neither"
            raise ValueError(f"prompt: expected exactly one of prompt (string) or messages (chat turns), got {got}")
        return self


class DetokenizeBody(NullIsAbsent):
    model_config = ConfigDict(extra="ignore", strict=True)  # "yes" is no bool, as on every route

    model: str | None = None
    tokens: list[StrictInt]


@router.post("/tokenize")
async def tokenize(body: TokenizeBody, request: Request) -> dict:
    app = request.app
    entry = entry_of(app, body.model) if body.model else None
    if body.prompt is not None:  # text no context could hold is refused untokenized, as generation refuses it
        app.state.generation.check_length(len(body.prompt))
    else:
        app.state.generation.check_turns(body.messages)
    ids = await asyncio.to_thread(_ids, app.state.base.tokenizer, body)
    strs = app.state.base.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return {"count": len(ids), "max_model_len": max_model_len(app, entry), "tokens": ids, "token_strs": strs}


def _ids(tok, body: TokenizeBody) -> list[int]:
    if body.prompt is not None:
        special = True if body.add_special_tokens is None else body.add_special_tokens
        return tok.encode(body.prompt, add_special_tokens=special)
    return chat_prompt_ids(tok, body.messages, body.add_generation_prompt)[0]


@router.post("/detokenize")
async def detokenize(body: DetokenizeBody, request: Request) -> dict:
    base = request.app.state.base
    if body.model:
        entry_of(request.app, body.model)
    vocab = base.geometry.vocab
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise InvalidRequestError(f"tokens: expected ids in [0, {vocab}), got {bad[:5]}")
    return {"prompt": await asyncio.to_thread(base.tokenizer.decode, body.tokens)}
