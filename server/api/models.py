"""What the OpenAI-style APIs know of a `model` name: the base model's or an adapter's.

`max_model_len` is the tokens one request may use with that model: the base model's context, less
a soft prompt's virtual tokens (which the model processes before the prompt), so a client that
fits its prompt plus `max_tokens` into `max_model_len` is never refused for length.
"""
from __future__ import annotations

from fastapi import FastAPI

from server.adapters.adapter import Entry
from server.adapters.composition import Part
from server.api.generation import Selection
from server.errors import InvalidRequestError


def adapter_of(app: FastAPI, model: str) -> str | None:
    """None for the base model's name, else the adapter name (checked when the request acquires it)."""
    return None if model == app.state.base.name else model


def selection_of(app: FastAPI, model: str, parts: tuple[Part, ...] | None) -> Selection:
    """What a request runs: the adapter `model` names, or its `adapters` list (then `model` is the base's)."""
    name = adapter_of(app, model)
    if parts is not None and name is not None:
        raise InvalidRequestError(f"model: expected the base model's name {app.state.base.name!r} with an "
                                  f"`adapters` list (the list names the adapters), got {model!r}")
    return parts or name


def n_virtual(entry: Entry | None) -> int:
    return int(entry.manifest.get("details", {}).get("num_virtual_tokens", 0)) if entry and entry.kind == "prompt" else 0


def max_model_len(app: FastAPI, entry: Entry | None) -> int:
    return app.state.base.geometry.max_len - n_virtual(entry)


def entry_of(app: FastAPI, model: str) -> Entry | None:
    """The adapter's registration (404 when unknown), None for the base model."""
    name = adapter_of(app, model)
    return app.state.registry.get(name) if name else None


def default_max_tokens(app: FastAPI, selection: Selection, prompt_ids: list[int]) -> int:
    """No max_tokens given: up to the end of the context (as vLLM), within --max-new-tokens-limit."""
    names = [] if selection is None else [selection] if isinstance(selection, str) else [p.name for p in selection]
    virtual = sum(n_virtual(app.state.registry.get(name)) for name in names)
    room = app.state.base.geometry.max_len - virtual - len(prompt_ids)
    return max(1, min(room, app.state.generation.max_new_tokens_limit))


def card(app: FastAPI, entry: Entry | None) -> dict:
    base = app.state.base
    body = {"id": entry.name if entry else base.name, "object": "model",
            "created": int(entry.created_at if entry else app.state.started_at), "owned_by": "hotswap",
            "root": base.name, "parent": base.name if entry else None, "max_model_len": max_model_len(app, entry)}
    if entry:
        body["kind"] = entry.kind
    return body
