"""The ingress deployment: Ray Serve's HTTP entry, same contract as the single server.

Each request is read whole, tagged with the adapter it names (routing.py) as Ray's multiplexed
model id, and handed to a replica; the replica's response streams back as it comes. A replica that
dies before answering gives a 503 `replica_unavailable` with Retry-After (the request never ran to
completion, so retrying is safe); one that dies mid-stream ends the stream with an SSE error event.
"""
# No `from __future__ import annotations`: Ray Serve's ingress wrapper resolves the endpoint's
# annotations (Request) where string annotations would be looked up in the wrong module.
import json
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.handle import DeploymentHandle

from server.api.error_shapes import error_body, error_response
from server.cluster.asgi import Forwarded, Start
from server.cluster.routing import adapter_of

log = logging.getLogger(__name__)

REPLICA_GONE = (RayActorError, ActorDiedError, ActorUnavailableError)
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]  # all: the replica answers as the server
RETRY_AFTER_S = 1

http = FastAPI(title="hotswap cluster", openapi_url=None, docs_url=None, redoc_url=None)  # the replica's, forwarded


# Helpers come before the class: Ray pickles the decorated class with the globals defined so far.
async def _body(parts, path: str) -> AsyncIterator[bytes]:
    try:
        async for chunk in parts:
            yield chunk
    except REPLICA_GONE as exc:
        log.warning("replica gone mid-stream: %s", exc)
        error = error_body(path, 503, "replica_unavailable", "the replica serving this stream stopped; retry")
        yield f"event: error\ndata: {json.dumps(error)}\n\n".encode()
    finally:
        parts.cancel()


def _headers(headers: list[tuple[str, str]]) -> dict[str, str]:
    return {k: v for k, v in headers if k.lower() != "content-length"}


def _unavailable(path: str) -> JSONResponse:
    return error_response(path, 503, "replica_unavailable",
                          "the replica for this request stopped before answering; retry", {"Retry-After": str(RETRY_AFTER_S)})


@serve.deployment
@serve.ingress(http)
class Ingress:
    def __init__(self, replica: DeploymentHandle) -> None:
        self.replica = replica
        self._base_name: str | None = None

    @http.api_route("/{path:path}", methods=METHODS, include_in_schema=False)
    async def forward(self, path: str, request: Request) -> Response:
        body = await request.body()
        forwarded = Forwarded(request.method, request.url.path, request.url.query.encode("latin-1"),
                              list(request.headers.items()), body)
        try:
            adapter = adapter_of(forwarded.path, forwarded.query_string, body, await self._base())
            parts = self.replica.options(multiplexed_model_id=adapter, stream=True).handle.remote(forwarded)
            start = await parts.__anext__()
        except REPLICA_GONE as exc:
            log.warning("replica gone before answering %s %s: %s", request.method, request.url.path, exc)
            return _unavailable(request.url.path)
        assert isinstance(start, Start)
        return StreamingResponse(_body(parts, request.url.path), status_code=start.status, headers=_headers(start.headers))

    async def _base(self) -> str:
        if self._base_name is None:
            self._base_name = await self.replica.base_name.remote()
        return self._base_name
