"""The shutdown deadline of in-flight generations: past it, each one ends with 503 `shutting_down`.

uvicorn waits for running requests, then cancels them, and a cancelled request that has not
answered yet gets uvicorn's plain-text 500. So the server starts this deadline as its shutdown
begins (server/http.py, `--shutdown-timeout-s`) and gives uvicorn a little longer: every wait on
the engine, and every wait for a resident adapter slot, is bounded by the deadline, and a request
still running when it passes answers 503 as JSON, or as an SSE error event once its stream has
started; the engine drops its row.
"""
from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from server.errors import ShuttingDownError

T = TypeVar("T")


class Drain:
    def __init__(self) -> None:
        self.deadline: float | None = None  # event-loop time; None until the shutdown begins
        self.timeout_s = 0.0
        self._bounds: set[asyncio.Timeout] = set()  # the waits in flight, rescheduled by begin()

    def begin(self, timeout_s: float) -> None:
        """The shutdown began (on the event loop): in-flight waits end `timeout_s` from now."""
        self.timeout_s = timeout_s
        self.deadline = asyncio.get_running_loop().time() + timeout_s
        for bound in self._bounds:
            bound.reschedule(self.deadline)

    async def next(self, source: AsyncIterator[T]) -> T:
        """The next item of `source`, or ShuttingDownError once the deadline has passed."""
        return await self.wait(anext(source))

    async def wait(self, awaitable: Awaitable[T]) -> T:
        """`awaitable`'s result (a wait on the engine, or for a resident adapter slot), or
        ShuttingDownError once the deadline has passed (`awaitable` is then cancelled)."""
        if self.deadline is not None and asyncio.get_running_loop().time() >= self.deadline:
            if inspect.iscoroutine(awaitable):
                awaitable.close()
            raise self._error()
        bound = asyncio.timeout_at(self.deadline)
        try:
            async with bound:
                self._bounds.add(bound)
                try:
                    return await awaitable
                finally:
                    self._bounds.discard(bound)
        except TimeoutError:
            if not bound.expired():
                raise
            raise self._error() from None

    def _error(self) -> ShuttingDownError:
        return ShuttingDownError(
            f"the server shut down before this request finished: expected it to end within "
            f"--shutdown-timeout-s {self.timeout_s:g}s, it was still running"
        )
