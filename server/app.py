"""create_app(settings): the FastAPI app; its lifespan loads the model, opens the adapter store and starts the engine.

`--adapter NAME=DIR` flags are imported into the store at start-up (normalised, validated, written
atomically like an upload), replacing a stored adapter of that name unless the folder's files are
unchanged; so a flag's adapter stays registered after a restart without the flag, until deleted.
With the embedded default model, a new store also gets the example adapters trained on it
(`examples/`, see scripts/train_adapters.py), once: a deleted example stays deleted.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from server.adapters.registry import Registry
from server.api import adapters, generate, health, lorax, openai, tokenize
from server.api.deps import check_guards
from server.api.error_shapes import error_response
from server.api.generation import Generation
from server.config import Settings
from server.engine import threads
from server.engine.engine import Engine, EngineSettings
from server.gateway import gateway_state
from server.http import BodyLimit, CancelOnDisconnect, Responses
from server.errors import AdapterExistsError, HotswapError, InvalidRequestError, UnsupportedMediaTypeError
from server.metrics import Metrics
from server.model import DEFAULT_MODEL_DIR, load_base_model
from server.store import Store

log = logging.getLogger(__name__)
EXAMPLES_DIR = DEFAULT_MODEL_DIR.parent / "examples"


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(title="hotswap", lifespan=_lifespan)
    app.state.settings = settings
    app.state.draining = False
    routers = (generate, openai, tokenize, lorax, adapters, health)
    for module in routers:
        app.include_router(module.router)
    app.add_middleware(lorax.LoraxBodies)  # inside BodyLimit: a body is limited before it is read
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    app.add_middleware(CancelOnDisconnect)  # it watches the server's own receive
    app.state.routes = [r for m in routers for r in m.router.routes]
    app.add_middleware(Responses, routes=app.state.routes)  # outermost: it counts every answer
    _install_error_handlers(app)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI):
    settings: Settings = app.state.settings
    default = threads.serial()  # every thread but the engine's: one CPU thread each (engine/threads.py)
    engine_threads = settings.threads or default
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(thread_name_prefix="hotswap-worker", initializer=threads.one))  # asyncio.to_thread's
    base = load_base_model(settings.model, settings.device, settings.dtype, settings.onednn_linear)
    metrics = Metrics(per_adapter_limit=settings.metrics_per_adapter_limit)
    new_store = not settings.store.exists()
    registry = Registry(base, metrics, Store(settings.store), settings.max_resident_adapters,
                        settings.max_adapter_memory_bytes, shared=settings.shared_store)
    await asyncio.to_thread(registry.open)  # recover interrupted writes, register what the store holds
    if new_store and settings.examples and settings.model is None:
        await asyncio.to_thread(_import_examples, registry)
    for name, folder in _adapter_flags(settings.adapter):
        await asyncio.to_thread(registry.import_folder, name, folder, source=f"flag:{folder}", replace=True,
                                skip_unchanged=True)
    engine = Engine(base, _engine_settings(settings, engine_threads), metrics, release=_releaser(registry))
    engine.start()
    registry.on_engine = engine.call  # base weight reads and device placement: between engine steps
    app.state.base, app.state.metrics, app.state.registry, app.state.engine = base, metrics, registry, engine
    app.state.generation = Generation(base, registry, engine, settings.max_new_tokens_limit)
    metrics.watch_gateway(lambda: gateway_state(engine, registry))  # vllm:* series for the Gateway API
    app.state.started_at = time.time()
    await registry.load_pinned()
    await asyncio.to_thread(engine.wait_ready)
    log.info("ready: %s with %d adapters", base.name, len(registry.all()))
    polls = settings.shared_store and settings.store_poll_s > 0
    poll = asyncio.create_task(_poll_store(registry, settings.store_poll_s)) if polls else None
    yield
    if poll is not None:
        poll.cancel()
    app.state.draining = True
    await asyncio.to_thread(engine.stop, settings.shutdown_timeout_s)


async def _poll_store(registry: Registry, every_s: float) -> None:
    """Shared store: take in other servers' changes between requests too, so this server's gauges
    (registered, resident, memory) are current, a deleted adapter's memory is freed and an adapter
    pinned elsewhere is loaded here too."""
    while True:
        await asyncio.sleep(every_s)
        try:
            await asyncio.to_thread(registry.sync)
            await registry.load_pinned(registry.pending_pins())
        except OSError as exc:
            log.warning("store: re-reading the shared store failed: %s", exc)


def _import_examples(registry: Registry) -> None:
    for folder in sorted(p for p in EXAMPLES_DIR.iterdir() if p.is_dir()):
        try:
            registry.import_folder(folder.name, folder, source=f"example:{folder.name}")
        except AdapterExistsError:  # a shared store: another replica registered it first
            log.info("example %s is already registered", folder.name)


def _engine_settings(s: Settings, threads: int) -> EngineSettings:
    return EngineSettings(
        max_batch_size=s.max_batch_size,
        max_batch_tokens=s.max_batch_tokens,
        max_prefill_tokens=s.max_prefill_tokens,
        max_waiting=s.max_waiting,
        phase_quantum_s=s.phase_quantum_s,
        prefix_cache=s.prefix_cache,
        prompt_cache=s.prompt_cache,
        prefill_chunk_tokens=s.prefill_chunk_tokens,
        kv_block_tokens=s.kv_block_tokens,
        threads=threads,
        cuda_graphs=s.cuda_graphs,
    )


def _releaser(registry: Registry):
    def release(req) -> None:
        if req.adapter is not None:
            registry.release(req.adapter)

    return release


def _adapter_flags(values: list[str]) -> list[tuple[str, Path]]:
    pairs = []
    for value in values:
        name, sep, folder = value.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"--adapter: expected NAME=DIR, got {value!r}")
        pairs.append((name, Path(folder)))
    return pairs


UNPARSED = "There was an error parsing the body"  # FastAPI's detail when json.loads raises other than JSONDecodeError
UNPARSED_MESSAGE = "body: expected a JSON object in UTF-8, nested less than about a thousand levels deep; got a " \
                   "body that is not UTF-8 or nests deeper"


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HotswapError)
    async def hotswap_error(request: Request, exc: HotswapError) -> JSONResponse:
        return _answer(request, exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _guarded(request) or _answer(request, _not_json(request, exc) or InvalidRequestError(_describe(exc)))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == UNPARSED:
            return _guarded(request) or _answer(request, InvalidRequestError(UNPARSED_MESSAGE))
        if exc.status_code == 404 and request.scope.get("route") is None:  # no route has this path
            message = f"path: expected a route of this server (GET /openapi.json lists them), got " \
                      f"{request.method} {request.url.path}"
            return error_response(request.url.path, 404, "http_error", message)
        if exc.status_code == 405:
            allowed = sorted({m for r in app.state.routes if r.path_regex.match(request.url.path) for m in r.methods})
            message = f"method: expected {' or '.join(allowed)} for {request.url.path}, got {request.method}"
            return error_response(request.url.path, 405, "http_error", message, {"Allow": ", ".join(allowed)})
        return error_response(request.url.path, exc.status_code, "http_error", str(exc.detail), exc.headers)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        """A bug: Starlette logs it with its traceback; the client still gets JSON, not plain text."""
        return error_response(request.url.path, 500, HotswapError.type,
                              f"internal error ({type(exc).__name__}); the server log has the details")


def _answer(request: Request, exc: HotswapError) -> JSONResponse:
    return error_response(request.url.path, exc.status, exc.type, exc.message, exc.headers())


def _guarded(request: Request) -> JSONResponse | None:
    """The 401/403 of a client its route's guards refuse, else None (the body's own 400 may go out)."""
    try:
        check_guards(request)
    except HotswapError as exc:
        return _answer(request, exc)
    return None


def _not_json(request: Request, exc: RequestValidationError) -> UnsupportedMediaTypeError | None:
    """A JSON route's body that FastAPI left as bytes: its content-type is not JSON (curl's `-d`
    alone sends application/x-www-form-urlencoded)."""
    if not any(tuple(e.get("loc", ())) == ("body",) and isinstance(e.get("input"), bytes) for e in exc.errors()):
        return None
    got = request.headers.get("content-type") or "no content-type"
    return UnsupportedMediaTypeError(f"content-type: expected application/json, got {got}")


def _describe(exc: RequestValidationError) -> str:
    """One line per field at fault: where, what was expected, what came. A value that matched no member
    of a union (`prompt`: a string, token ids, ...) is one line, each member's first complaint in it."""
    parts: dict[str, list[str]] = {}  # where -> what was expected, in pydantic's order
    got: dict[str, object] = {}
    unions: set[str] = set()  # the fields whose value matched no member of their union
    for err in exc.errors():
        if err.get("type") == "json_invalid":  # loc: ("body", character offset)
            offset, why = err["loc"][-1], err.get("ctx", {}).get("error", "invalid")
            return f"body: expected a JSON object, got invalid JSON at character {offset} ({why})"
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        member = next((k for k, p in enumerate(loc) if UNION_MEMBER.search(p)), None)
        where = ".".join(loc if member is None else loc[:member])
        message = str(err.get("ctx", {}).get("error", "")) if err.get("type") == "value_error" else ""
        if member is None and FIELD_FIRST.match(message):  # a model's own check: its message names the field
            parts.setdefault(f"{where}.{message}" if where else message, [])
            continue
        wants = parts.setdefault(where or "body", [])
        said = err.get("msg", "invalid").removeprefix("Value error, ")
        if member is None:
            wants.append(said)
        elif not any(w.startswith((loc[member] + ":", loc[member] + ".")) for w in wants):
            wants.append(f"{'.'.join(loc[member:])}: {said}")  # this member's first complaint
            unions.add(where or "body")
        if member is None or len(loc) == member + 1:  # the value itself, not a part of it
            got.setdefault(where or "body", err.get("input"))
    return "; ".join(_line(where, wants, got, where in unions) for where, wants in parts.items())


def _line(where: str, wants: list[str], got: dict[str, object], union: bool) -> str:
    if not wants:
        return where
    said = "no form fits (" + " | ".join(wants) + ")" if union else " or ".join(dict.fromkeys(wants))
    return f"{where}: {said}" + (f"; got {_short(got[where])}" if where in got else "")


UNION_MEMBER = re.compile(r"[\[\]-]|^(str|int|float|bool|list|dict)$")  # pydantic's tag of a union member in a loc
FIELD_FIRST = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*: ")  # a message that starts with the field it is about


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
