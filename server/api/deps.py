"""Services and guards the routers read from `app.state`."""
from __future__ import annotations

import asyncio
import hmac

from fastapi import Request

from server.errors import AuthenticationError, ForbiddenError


def _check_bearer(request: Request, expected: str | None, what: str) -> None:
    if not expected:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationError(f"{what}: expected 'Authorization: Bearer <token>', got {'no header' if not header else 'another scheme'}")
    if not hmac.compare_digest(token.encode(), expected.encode()):
        raise ForbiddenError(f"{what}: the bearer token is not valid")


def require_api_key(request: Request) -> None:
    _check_bearer(request, request.app.state.settings.api_key, "api key")


def require_admin(request: Request) -> None:
    _check_bearer(request, request.app.state.settings.admin_token, "admin token")


async def synced_store(request: Request) -> None:
    """Shared store (cluster): take in other servers' uploads, deletes and pins before answering."""
    registry = request.app.state.registry
    if registry.shared:
        await asyncio.to_thread(registry.sync)
