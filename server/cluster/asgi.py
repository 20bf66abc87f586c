"""Call an ASGI app in-process with one buffered HTTP request and stream its response back.

A replica runs the single server's FastAPI app as it is; the ingress hands it the request as a
plain `Forwarded` record (Ray pickles it between processes) and relays the parts this yields.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Forwarded:
    method: str
    path: str
    query_string: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""


@dataclass(frozen=True)
class Start:
    status: int
    headers: list[tuple[str, str]]


async def call(app, request: Forwarded) -> AsyncIterator[Start | bytes]:
    """Yields the response's Start, then its body chunks as the app sends them.

    Closing the iterator early (the client went away) tells the app the client disconnected.
    """
    messages: asyncio.Queue = asyncio.Queue()
    disconnected = asyncio.Event()
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def run() -> None:
        try:
            await app(_scope(request), receive, messages.put)
        finally:
            await messages.put(None)

    task = asyncio.create_task(run())
    try:
        while (message := await messages.get()) is not None:
            if message["type"] == "http.response.start":
                yield Start(message["status"], [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message["headers"]])
            elif message["type"] == "http.response.body" and message.get("body"):
                yield message["body"]
        await task  # re-raise what the app raised
    finally:
        disconnected.set()
        if not task.done():
            await asyncio.wait_for(task, timeout=30)


def _scope(request: Forwarded) -> dict:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "scheme": "http",
        "method": request.method, "path": request.path, "raw_path": request.path.encode(), "root_path": "",
        "query_string": request.query_string, "client": ("127.0.0.1", 0), "server": ("hotswap-replica", 80),
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in request.headers],
    }
