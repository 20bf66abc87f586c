"""The engine's waiting room: requests submitted and not yet admitted, at most `--max-waiting`.

A client request of several choices (OpenAI's `n`, a list of prompts) is let in whole or not at
all: `promise(n)` holds n places at once (or raises 429, counted as n refusals), each choice's
submission then takes one of them, and the promise, closed, gives back those never taken. So such a
request is never half queued (its first choices decoding for nobody while the last is refused),
and a 429's count of those waiting does not include the request's own choices.

Submissions and promises come from the event loop, admissions leave from the engine thread: the
counts are guarded by one lock.
"""
from __future__ import annotations

import threading
from typing import NoReturn

from server.errors import QueueFullError
from server.metrics import Metrics


class Promise:
    """Places held for one request's choices; a context manager that gives back the untaken ones."""

    def __init__(self, room: WaitingRoom, places: int) -> None:
        self.room = room
        self.places = places

    def __enter__(self) -> Promise:
        return self

    def __exit__(self, *exc) -> None:
        self.room.give_back(self)


class WaitingRoom:
    """The counts, the bound, and who may come in."""

    def __init__(self, limit: int, metrics: Metrics) -> None:
        self.limit = limit
        self.metrics = metrics
        self.waiting = 0  # submitted, not yet admitted
        self.promised = 0  # held by promises, not yet submitted
        self._lock = threading.Lock()

    def promise(self, places: int, kind: str, mode: str | None, adapters: tuple[str, ...]) -> Promise:
        """`places` at once, or QueueFullError (each place counted as a refused request of `kind`)."""
        with self._lock:
            taken = self.waiting + self.promised
            if taken + places <= self.limit:
                self.promised += places
                return Promise(self, places)
        self._refuse(places, kind, mode, adapters, taken)

    def enter(self, kind: str, mode: str | None, adapters: tuple[str, ...], promise: Promise | None) -> None:
        """One submitted request: on a place of `promise` if it has one left, else on a free place or QueueFullError."""
        with self._lock:
            taken = self.waiting + self.promised
            promised = promise is not None and promise.places > 0
            if promised or taken < self.limit:
                if promised:
                    promise.places -= 1
                    self.promised -= 1
                self.waiting += 1
                return
        self._refuse(1, kind, mode, adapters, taken)

    def leave(self, n: int = 1) -> None:
        """n requests admitted, or ended while waiting."""
        with self._lock:
            self.waiting -= n

    def give_back(self, promise: Promise) -> None:
        with self._lock:
            self.promised -= promise.places
            promise.places = 0

    def _refuse(self, places: int, kind: str, mode: str | None, adapters: tuple[str, ...], taken: int) -> NoReturn:
        """Count `places` refused requests and raise the 429 (`taken`: the places taken by others)."""
        for _ in range(places):
            self.metrics.request_rejected(kind, mode, adapters=adapters)
        raise QueueFullError(taken)
