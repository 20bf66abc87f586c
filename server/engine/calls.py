"""Functions other threads hand to the engine thread, run between two steps.

What reads or writes the base weights (DoRA norms, bias checks, placing adapter tensors on the
device) goes through here, so it can never overlap a merge, which also runs on the engine thread.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

import torch

T = TypeVar("T")
CALL_TIMEOUT_S = 120.0  # longest another thread waits for its call


class EngineCalls:
    def __init__(self, thread: threading.Thread, wake: threading.Event) -> None:
        self._thread = thread
        self._wake = wake
        self._queue: queue.SimpleQueue[tuple[Callable[[], object], Future]] = queue.SimpleQueue()

    def __bool__(self) -> bool:
        return not self._queue.empty()

    def call(self, fn: Callable[[], T], timeout_s: float = CALL_TIMEOUT_S) -> T:
        """Run `fn()` on the engine thread and return its result (blocking; any thread). Before the
        thread starts and after it ends, `fn` runs in the calling thread: no merge can run then."""
        if threading.current_thread() is self._thread or not self._thread.is_alive():
            with torch.inference_mode():
                return fn()
        future: Future = Future()
        self._queue.put((fn, future))
        self._wake.set()
        return future.result(timeout_s)

    def run_pending(self) -> None:
        """On the engine thread: run every call handed in so far, handing back results or exceptions."""
        while not self._queue.empty():
            fn, future = self._queue.get_nowait()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed back to the caller's thread
                future.set_exception(exc)
