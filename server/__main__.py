"""`python -m server`: serve. Every flag mirrors a Settings field and its HOTSWAP_<FLAG> variable."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import typing

from uvicorn.main import STARTUP_FAILURE

from server.app import create_app
from server.config import Settings
from server.http import Server, uvicorn_config


def build_parser(settings_cls: type[Settings] = Settings, prog: str = "python -m server",
                 description: str = "hotswap: one base model, many adapters") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for name, field in settings_cls.model_fields.items():
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


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    settings = Settings(**given)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # uvicorn drains on SIGTERM, then re-raises the signal under the handler it found at start:
    # a no-op handler there makes a drained shutdown exit 0 instead of dying by the signal.
    signal.signal(signal.SIGTERM, _drained)
    app = create_app(settings)
    server = Server(uvicorn_config(app, settings), app)
    server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)  # as uvicorn.run does: the app did not start (model, store, port)


def _drained(signum: int, frame: object) -> None:
    logging.getLogger(__name__).info("drained after signal %d; exiting", signum)


if __name__ == "__main__":
    main()
