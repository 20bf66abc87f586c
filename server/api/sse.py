"""Server-sent events for streamed generations, and the guarantee that a stream always ends its request.

A router first submits the request and awaits its first token (`Generation.start`), so a refusal
(429, 503, an unknown adapter, a refused merge) is answered as a JSON error before any header.
Only then is the 200 sent. An error after that is an SSE event with the error in its route
family's shape (api/error_shapes.py: `data: {"error": {"type", "message"}}` natively, OpenAI's on
`/v1/*`, LoRAX's on its routes) and the stream ends. However the response ends (finished, client gone before the
first byte, cancelled), `EventStream` closes its events, which cancels the request in the engine
and so releases its adapter.
"""
from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import TypeVar

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from server.api.error_shapes import error_body
from server.errors import HotswapError

log = logging.getLogger(__name__)
T = TypeVar("T")


class EventStream(StreamingResponse):
    """`text/event-stream` whose source is closed when the response ends, even if it never started."""

    def __init__(self, body: AsyncGenerator[str, None], source: AsyncGenerator) -> None:
        super().__init__(body, media_type="text/event-stream")
        self._source = source

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            await self._source.aclose()


def stream_response(first: T, rest: AsyncGenerator[T, None], render: Callable[[T], str], path: str,
                    end: str = "") -> EventStream:
    """An SSE response of `first` then `rest`, each rendered by `render`; `end` closes a stream that
    finished; an error ends it with an event in the shape of `path`'s routes."""
    return EventStream(_events(first, rest, render, path, end), rest)


async def _events(first: T, rest: AsyncGenerator[T, None], render: Callable[[T], str], path: str,
                  end: str) -> AsyncIterator[str]:
    try:
        yield render(first)
        async for item in rest:  # EventStream closes `rest` however this ends
            yield render(item)
    except HotswapError as exc:
        yield error_event(exc, path)
        return
    if end:
        yield end


def error_event(exc: HotswapError, path: str) -> str:
    log.info("stream ended by %s: %s", exc.type, exc.message)
    return f"data: {json.dumps(error_body(path, exc.status, exc.type, exc.message))}\n\n"
