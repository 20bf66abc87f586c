"""Services and guards the routers read from `app.state`."""
from __future__ import annotations

import asyncio
import hmac

from fastapi import Request

from server.errors import AuthenticationError, ForbiddenError


def _check_bearer(request: Request, accepted: list[str], what: str) -> None:
    """401 without a bearer token, 403 with one that is none of `accepted`; nothing to check if none is."""
    if not accepted:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        got = "no header" if not header else "another scheme" if scheme.lower() != "bearer" else "no token"
        raise AuthenticationError(f"{what}: expected 'Authorization: Bearer <token>', got {got}")
    if not any(hmac.compare_digest(token.encode(), good.encode()) for good in accepted):
        raise ForbiddenError(f"{what}: the bearer token is not valid")


def require_api_key(request: Request) -> None:
    """Generation and reads of adapters (docs/auth.md): the api key, or the admin token, when an api key is set."""
    settings = request.app.state.settings
    accepted = [settings.api_key, settings.admin_token] if settings.api_key else []
    _check_bearer(request, [t for t in accepted if t], "api key")


def require_admin(request: Request) -> None:
    """Changes to adapters (docs/auth.md): the admin token; with none set, the api key, so that
    `--api-key` alone never leaves uploads and deletes open."""
    settings = request.app.state.settings
    token = settings.admin_token or settings.api_key
    _check_bearer(request, [token] if token else [], "admin token" if settings.admin_token else "api key")


GUARDS = (require_api_key, require_admin)


def check_guards(request: Request) -> None:
    """Run the guards of the route `request` matched: a body FastAPI could not parse (its 400 comes
    before any dependency) is refused 401/403 first, as every other body is, to a client not allowed
    to send it."""
    route = request.scope.get("route")
    for dependency in getattr(route, "dependant").dependencies if route is not None else ():
        if dependency.call in GUARDS:
            dependency.call(request)


async def synced_store(request: Request) -> None:
    """Shared store (cluster): take in other servers' uploads, deletes and pins before answering."""
    registry = request.app.state.registry
    if registry.shared:
        await asyncio.to_thread(registry.sync)
