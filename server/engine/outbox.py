"""Events from the engine thread to the requests' event loops: one wake-up per loop and hand-over.

Handing an event to an asyncio loop from another thread (`call_soon_threadsafe`) writes a byte to
the loop's self-pipe, a system call, and wakes the loop. One per row and token made a decode step
of 128 rows pay 128 of them (~1.5 ms of the engine thread on the 2-core dev VM, BENCHMARKS.md).
The engine puts each event here as it makes it and hands them over after each stage of an
iteration (the prefill, a chunk, the decode step; `flush`): every loop gets its events in one call,
each request's in the order they were put.
"""
from __future__ import annotations

import asyncio

from server.engine.request import Event, Request


class Outbox:
    """Engine thread only: `put` events, then `flush` them to their loops."""

    def __init__(self) -> None:
        self._held: list[tuple[Request, Event]] = []

    def put(self, req: Request, event: Event) -> None:
        self._held.append((req, event))

    def flush(self) -> None:
        """Hand every held event to its request's loop, one call per loop. A request whose loop has
        closed is marked cancelled and its events dropped: nobody is left to read them, and the
        engine thread must not die of it."""
        held, self._held = self._held, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Request, Event]]] = {}
        for req, event in held:
            by_loop.setdefault(req.loop, []).append((req, event))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # "Event loop is closed"
                for req, _ in items:
                    req.cancelled = True


def _deliver(items: list[tuple[Request, Event]]) -> None:
    """On the loop: each event into its request's queue, in order."""
    for req, event in items:
        req.queue.put_nowait(event)
