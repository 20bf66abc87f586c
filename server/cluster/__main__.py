"""`python -m server.cluster --replicas N [server flags]`: hotswap on Ray Serve, until SIGTERM or Ctrl-C."""
from __future__ import annotations

import logging
import signal
import threading

import ray
from ray import serve

from server.__main__ import build_parser
from server.cluster.app import build
from server.cluster.config import ClusterSettings

APP_NAME = "hotswap"


def main(argv: list[str] | None = None) -> None:
    parser = build_parser(ClusterSettings, "python -m server.cluster", "hotswap on Ray Serve: N replicas, one store")
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    settings = ClusterSettings(**given)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    ray.init(address=settings.ray_address, include_dashboard=False)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build(settings), name=APP_NAME, route_prefix="/", blocking=False)
    logging.getLogger(__name__).info("serving %d replicas on http://%s:%d", settings.replicas, settings.host, settings.port)
    stop.wait()
    serve.delete(APP_NAME)  # replicas drain their in-flight requests
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
