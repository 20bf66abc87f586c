"""The replica deployment: the single server's whole app (engine, registry, HTTP contract) in a Ray actor.

Requests arrive from the ingress as `Forwarded` records and run through the app in-process, so a
replica answers exactly what `python -m server` would, plus `x-hotswap-replica: <replica id>`.
Ray Serve's model multiplexing routes an adapter's requests to replicas that report it loaded:
`load` (the multiplexed function) makes the adapter resident in this replica's registry, whose own
LRU decides what stays; Ray's per-replica LRU is sized to match. The store is shared
(`shared_store`): every replica sees every upload and delete.
"""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from prometheus_client import start_http_server
from ray import serve

from server.app import create_app
from server.cluster.asgi import Forwarded, Start, call
from server.config import Settings
from server.errors import HotswapError

log = logging.getLogger(__name__)

REPLICA_HEADER = "x-hotswap-replica"


def replica_class(max_resident: int) -> type:
    """The deployment class, with Ray's multiplex LRU as large as the registry's residency."""

    class Replica:
        async def __init__(self, settings: dict, metrics_port: int) -> None:
            context = serve.get_replica_context()
            self.id = context.replica_id.unique_id
            self.app = create_app(Settings(**{**settings, "shared_store": True}))
            self._lifespan = self.app.router.lifespan_context(self.app)
            await self._lifespan.__aenter__()
            if metrics_port:
                _export_metrics(self.app, metrics_port + context.rank.local_rank)

        @serve.multiplexed(max_num_models_per_replica=max_resident)
        async def load(self, name: str) -> str:
            registry = self.app.state.registry
            registry.release(await registry.acquire(name))
            return name

        async def handle(self, request: Forwarded) -> AsyncIterator[Start | bytes]:
            name = serve.get_multiplexed_model_id()
            if name:
                try:
                    await self.load(name)
                except HotswapError:
                    pass  # unknown or unloadable: the app answers with its own 4xx/5xx below
            async for part in call(self.app, request):
                if isinstance(part, Start):
                    part = Start(part.status, [*part.headers, (REPLICA_HEADER, self.id)])
                yield part

        def base_name(self) -> str:
            return self.app.state.base.name

        def check_health(self) -> None:
            """Ray Serve's health probe: a replica whose engine thread died is restarted."""
            if not self.app.state.engine.alive():
                raise RuntimeError("engine thread is not running")

        async def __del__(self) -> None:
            await self._lifespan.__aexit__(None, None, None)  # drain in-flight requests

    return Replica


def _export_metrics(app, port: int) -> None:
    """This replica's hotswap_* metrics on their own port, for Prometheus to scrape each replica."""
    try:
        start_http_server(port, registry=app.state.metrics.registry)
        log.info("metrics on :%d/metrics", port)
    except OSError as exc:
        log.warning("metrics port %d: %s; this replica's metrics are not exported", port, exc)
