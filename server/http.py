"""The HTTP server around the app: request-body limit, header-read timeout, and a shutdown that answers.

- `BodyLimit` (ASGI middleware): a body past `--max-body-bytes` is answered 413 JSON, from its
  Content-Length before a byte is read, else as soon as the bytes counted while streaming pass
  the limit. Adapter uploads (multipart `POST /adapters`) stream to disk under their own
  `--max-upload-bytes` (server/upload.py) and are left to it. A body not whole `--body-timeout-s`
  after the app first asks for it (an upload: whose next bytes take that long) is answered 408
  JSON and the connection closed: a client sending its body a byte a minute, or a byte just inside
  each wait, no longer holds a connection and a handler forever.
- `CancelOnDisconnect` (ASGI middleware): a client of a generation route that leaves before its
  response starts (not streamed, or a stream still waiting for its first token) cancels the handler, so
  its engine request is cancelled and its adapter released instead of decoding to its end for
  nobody. Once the response has started, the response's own writes (and Starlette's watch of a
  streaming response) see the disconnect.
- `Responses` (ASGI middleware, outermost): each answer counted in `hotswap_http_responses_total` by
  method, route template and status, the refusals above included; a client gone before any answer
  counts as 499 (nginx's "client closed request"). A method outside METHODS counts as "other", so a
  client inventing methods (h11 takes any token) cannot grow the series without bound.
- `--header-timeout-s`: uvicorn bounds only the idle time between requests (`timeout_keep_alive`);
  neither of its HTTP protocols bounds the time a client takes to send a request's headers (h11's
  `h11_max_incomplete_event_size` bounds their size, not their pace). So the protocol uvicorn would
  pick (httptools if installed, else h11) gets a timer from the connection's first byte, or a
  request's, until its headers are complete; past it the client gets 408 JSON and is disconnected.
  A head still incomplete after MAX_HEAD_BYTES gets 431 the same way (httptools takes any size;
  one that arrives whole in a single socket read, at most 256 KiB, is parsed as it is). Bytes that
  do not parse as HTTP get 400 JSON (uvicorn's own answer is plain text). These refusals come before
  any route or method is known: they count as method "other", route "unmatched".
- `Server`: when uvicorn's shutdown begins, /ready says draining and the in-flight generations get
  the `--shutdown-timeout-s` deadline (server/api/drain.py); uvicorn waits a little longer, so it
  never has to cancel a request that has not answered. A body still arriving at the deadline (an
  upload too) is answered 503 `shutting_down` as JSON, and the connection closed.
"""
from __future__ import annotations

import asyncio
import importlib.util
import json
import math
from collections.abc import Awaitable

import uvicorn
from fastapi import FastAPI
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.api.error_shapes import error_body
from server.config import Settings
from server.errors import ShuttingDownError

DRAIN_MARGIN_S = 2  # uvicorn's wait beyond the drain deadline: time for the 503s to be written
UNLIMITED = {("POST", "/adapters")}  # routes that stream their body under their own limit
MAX_HEAD_BYTES = 64 * 1024  # request line and headers (httptools has no bound; h11's is 16 KiB)
CLIENT_GONE = 499  # the code counted for a request answered nothing (nginx's)
UNMATCHED = "unmatched"  # the route counted for a path no route has
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})  # counted by name
OTHER_METHOD = "other"  # the method counted for any other, or for a request that never parsed
GENERATIONS = {("POST", path) for path in ("/generate", "/v1/completions", "/v1/chat/completions", "/",
                                           "/generate_stream")}  # native, OpenAI, LoRAX


def uvicorn_config(app: FastAPI, settings: Settings, **overrides) -> uvicorn.Config:
    """The uvicorn configuration `python -m server` serves the app with."""
    options = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "http": door_protocol(settings.header_timeout_s),
        "timeout_graceful_shutdown": math.ceil(settings.shutdown_timeout_s) + DRAIN_MARGIN_S,
        **overrides,
    }
    return uvicorn.Config(app, **options)


class Server(uvicorn.Server):
    """uvicorn, and the app's drain deadline starting as its shutdown begins."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.app = app

    async def shutdown(self, sockets=None) -> None:
        settings: Settings = self.app.state.settings
        self.app.state.draining = True
        generation = getattr(self.app.state, "generation", None)  # None: shut down before start-up ended
        if generation is not None:
            generation.drain.begin(settings.shutdown_timeout_s)
        await super().shutdown(sockets)


# ---------------------------------------------------------------- answers counted


class Responses:
    """Count each HTTP answer by method, route template and status (the app's metrics, once started).
    `routes`: the app's routes, for the template of a request refused before routing."""

    def __init__(self, app: ASGIApp, routes: list[BaseRoute]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        code = CLIENT_GONE

        async def counted_send(message: Message) -> None:
            nonlocal code
            if message["type"] == "http.response.start":
                code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counted_send)
        except Exception:
            code = 500 if code == CLIENT_GONE else code  # Starlette's error middleware, outside, answers 500
            raise
        finally:
            method = scope["method"] if scope["method"] in METHODS else OTHER_METHOD
            _count(scope["app"], method, self._route_of(scope), code)

    def _route_of(self, scope: Scope) -> str:
        """The path template of the route that served `scope` (or would have, for a refusal before routing)."""
        route = scope.get("route") or next((r for r in self.routes if r.matches(scope)[0] is not Match.NONE), None)
        return getattr(route, "path", UNMATCHED)


# ---------------------------------------------------------------- a client gone before its answer


class CancelOnDisconnect:
    """Cancel the handler of a generation whose client disconnects before the response starts (not
    that of an upload or a delete: those finish what they began)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"]) not in GENERATIONS:
            return await self.app(scope, receive, send)
        await _Watched(self.app)(scope, receive, send)


class _Watched:
    """One request: once the app has read its whole body, the server's receive is watched here (all
    it can still deliver is the disconnect), and the app's own later receives get that disconnect."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.body_read = asyncio.Event()
        self.gone = asyncio.Event()
        self.started = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def app_receive() -> Message:
            if self.body_read.is_set():  # the watcher holds the server's receive now
                await self.gone.wait()
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.disconnect":
                self.gone.set()
            elif not message.get("more_body", False):
                self.body_read.set()
            return message

        async def app_send(message: Message) -> None:
            self.started = self.started or message["type"] == "http.response.start"
            await send(message)

        handler = asyncio.ensure_future(self.app(scope, app_receive, app_send))
        watcher = asyncio.ensure_future(self._watch(receive))
        try:
            await asyncio.wait({handler, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not handler.done() and self.gone.is_set() and not self.started:
                handler.cancel()  # nobody waits for this answer
            await asyncio.wait({handler})
        finally:
            watcher.cancel()
            handler.cancel()  # this call itself was cancelled (the server shutting down): so is the handler
        if not handler.cancelled():
            handler.result()  # the app's own error, as without this middleware

    async def _watch(self, receive: Receive) -> None:
        await self.body_read.wait()
        while not self.gone.is_set():
            if (await receive())["type"] == "http.disconnect":
                self.gone.set()


# ---------------------------------------------------------------- request body


class BodyLimit:
    """413 JSON for a request body past `limit` bytes, before it is read whole; 408 JSON for one not
    whole `timeout_s` after it is first asked for (uploads, which stream under their own size limit,
    for one whose next bytes take that long)."""

    def __init__(self, app: ASGIApp, limit: int, timeout_s: float) -> None:
        self.app = app
        self.limit = limit
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = None if (scope["method"], scope["path"]) in UNLIMITED else self.limit
        declared = _content_length(scope)
        if limit is not None and declared is not None and declared > limit:
            return await _refuse(send, scope["path"], 413, "payload_too_large",
                                 _too_large(limit, f"{declared} (Content-Length)"))
        await _Counted(self.app, limit, self.timeout_s, bool(declared) or _chunked(scope))(scope, receive, send)


class _Counted:
    """One request whose body bytes are counted and timed as they arrive; past the limit or the time
    (`limit` None, an upload: each wait; else the whole body), the app's answer (an error about a
    body it could not read) is replaced by the 413 or 408.
    An answer that starts before the body is read whole (a 401 or 404 after the head) closes the
    connection: else the body's remaining bytes would be read as the next request's head."""

    def __init__(self, app: ASGIApp, limit: int | None, timeout_s: float, has_body: bool) -> None:
        self.app, self.limit, self.timeout_s = app, limit, timeout_s
        self.deadline: float | None = None  # loop time the whole body is due by (not for an upload)
        self.received = 0
        self.complete = not has_body
        self.refusal: tuple[int, str, str] | None = None  # status, type, message
        self.started = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def counted_receive() -> Message:
            if self.complete:
                return await receive()
            try:
                message = await _drained(scope, asyncio.wait_for(receive(), self._wait_s()))
            except ShuttingDownError as exc:  # uvicorn would cancel the handler: a plain-text 500
                self.refusal = 503, exc.type, exc.message
                return {"type": "http.disconnect"}
            except TimeoutError:
                self.refusal = 408, "request_timeout", self._late()
                return {"type": "http.disconnect"}  # the app stops reading
            if message["type"] == "http.request":
                self.received += len(message.get("body", b""))
                self.complete = not message.get("more_body", False)
                if self.limit is not None and self.received > self.limit:
                    self.refusal = 413, "payload_too_large", _too_large(self.limit,
                                                                        f"more ({self.received} bytes by then)")
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if self.refusal is not None and not self.started:
                return  # the app's answer to a body it could not read; the refusal replaces it
            if message["type"] == "http.response.start" and not self.complete:
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            self.started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if self.refusal is None:
                raise
        if self.refusal is not None and not self.started:
            await _refuse(send, scope["path"], *self.refusal)

    def _wait_s(self) -> float:
        """How long the body's next bytes may take: the rest of the whole body's time (an upload's: all of it)."""
        if self.limit is None:
            return self.timeout_s
        now = asyncio.get_running_loop().time()
        self.deadline = now + self.timeout_s if self.deadline is None else self.deadline
        return max(self.deadline - now, 0)

    def _late(self) -> str:
        got = f"got {self.received} bytes by then"
        if self.limit is None:
            return f"body: expected its next bytes within {self.timeout_s:g}s (--body-timeout-s), {got}"
        return f"body: expected it whole within {self.timeout_s:g}s (--body-timeout-s), {got}"


def _count(app: FastAPI, method: str, route: str, code: int) -> None:
    metrics = getattr(app.state, "metrics", None)  # None: before start-up ended
    if metrics is not None:
        metrics.http_response(method, route, code)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


async def _drained(scope: Scope, arrival: Awaitable[Message]) -> Message:
    """The body's next message, or ShuttingDownError once the shutdown deadline has passed."""
    generation = getattr(scope["app"].state, "generation", None)  # None: before start-up ended
    return await (arrival if generation is None else generation.drain.wait(arrival))


def _chunked(scope: Scope) -> bool:
    return any(name == b"transfer-encoding" for name, _ in scope["headers"])


def _too_large(limit: int, got: str) -> str:
    return f"body: expected at most {limit} bytes (--max-body-bytes), got {got}"


async def _refuse(send: Send, path: str, status: int, type_: str, message: str) -> None:
    """A JSON error (in the shape of `path`'s routes) instead of the app's answer, and the connection
    closed after it."""
    body = json.dumps(error_body(path, status, type_, message)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------- the request head


def door_protocol(timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's own choice of HTTP protocol (httptools if installed, else h11), with the header timer
    and JSON refusals."""
    if importlib.util.find_spec("httptools") is not None:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    else:
        base = H11Protocol
    return type(f"Door{base.__name__}", (_Door, base), {"header_timeout_s": timeout_s})


class _Door:
    """Mixin over a uvicorn HTTP protocol: a request's headers must be complete `header_timeout_s`
    after the connection opens or the request's first byte arrives. Both protocols start a new
    `cycle` once a request's headers are parsed, which is what stops the timer. A head that does
    not parse is refused in JSON too."""

    header_timeout_s: float
    _header_timer: asyncio.TimerHandle | None = None
    _head_bytes = 0  # received of the head still incomplete

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        before = self.cycle
        super().data_received(data)
        if self.cycle is not before:  # a head is complete
            self._disarm_header_timer()
            self._head_bytes = 0
        elif before is None or before.response_complete:  # bytes of a head still incomplete
            self._arm_header_timer()
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
                self._refuse(b"431 Request Header Fields Too Large", "headers_too_large",
                             f"headers: expected a request head of at most {MAX_HEAD_BYTES} bytes, got more")

    def connection_lost(self, exc) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """Both protocols' answer to bytes that do not parse as HTTP (`msg`: uvicorn's, always the same)."""
        self._refuse(b"400 Bad Request", "invalid_request",
                     "request: expected an HTTP/1.1 request line and headers, got bytes that do not parse as one")

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or not (self.cycle is None or self.cycle.response_complete):
            return
        self._refuse(b"408 Request Timeout", "request_timeout", f"headers: expected a complete request head "
                     f"within {self.header_timeout_s:g}s (--header-timeout-s), got part of one")

    def _refuse(self, status: bytes, type_: str, message: str) -> None:
        """Answer a request whose head never completed (or parsed) with a JSON error, and hang up."""
        self._disarm_header_timer()
        _count(self.config.app, OTHER_METHOD, UNMATCHED, int(status.split()[0]))
        body = json.dumps({"error": {"type": type_, "message": message}}).encode()
        head = (b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n"
                b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n")
        self.transport.write(head + body)
        self.transport.close()
