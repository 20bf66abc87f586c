"""`python -m server`: serve. Every flag mirrors a Settings field and its HOTSWAP_<FLAG> variable.

The engine loop runs on the process's main thread and uvicorn on a side thread: on the 2-core dev
machine a decode step driven from the main thread is ~20 % faster (BENCHMARKS.md). SIGTERM and
SIGINT ask uvicorn to drain; its lifespan then stops the engine, and the process exits 0.
"""
from __future__ import annotations

import argparse
import logging
import queue
import signal
import sys
import threading
import typing

import uvicorn

from server.app import create_app
from server.config import Settings
from server.engine.engine import Engine


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m server", description="hotswap: one base model, many adapters")
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = f"HOTSWAP_{name.upper()}"
        help_text = f"{field.description} (env {env}; default {field.get_default(call_default_factory=True)!r})"
        if field.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(field.annotation) is list:
            parser.add_argument(flag, action="append", default=None, help=help_text)
        else:
            parser.add_argument(flag, default=None, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    settings = Settings(**given)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handoff: queue.Queue[Engine] = queue.Queue()
    app = create_app(settings, run_engine=handoff.put)
    server = uvicorn.Server(uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s),
    ))
    web = threading.Thread(target=server.run, name="hotswap-http")
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: setattr(server, "should_exit", True))
    web.start()
    engine = _engine_from(handoff, web)
    if engine is None:
        return 1  # start-up failed; uvicorn has logged why
    engine.run()
    web.join()
    return 0


def _engine_from(handoff: queue.Queue[Engine], web: threading.Thread) -> Engine | None:
    """Wait for the lifespan to hand the engine over, or for the server thread to die trying."""
    while web.is_alive():
        try:
            return handoff.get(timeout=0.2)
        except queue.Empty:
            continue
    return None


if __name__ == "__main__":
    sys.exit(main())
