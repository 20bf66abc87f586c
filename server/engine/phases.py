"""Switching between the shared phase and merged phases, with an empty batch.

The scheduler decides which phase runs next (server/engine/scheduler.py); this does what entering
it takes: restore any merged adapter, merge the one the next phase needs, enter the phase. A
failed merge is rolled back bit-exactly by `merge` itself and ends only that adapter's waiting
requests; the engine then stays in the shared phase.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

from server.adapters.lora import MergedState, merge
from server.engine.faults import describe
from server.engine.scheduler import SHARED, Scheduler
from server.errors import HotswapError, RequestFailedError
from server.metrics import Metrics
from server.model import BaseModel

log = logging.getLogger(__name__)


class Phases:
    def __init__(self, base: BaseModel, scheduler: Scheduler, metrics: Metrics,
                 fail_waiting: Callable[[str, Exception], None]) -> None:
        self.base = base
        self.scheduler = scheduler
        self.metrics = metrics
        self._fail_waiting = fail_waiting  # (phase, error): end that phase's waiting requests
        self.merged: MergedState | None = None

    def switch(self, phase: str) -> None:
        """With an empty batch: restore any merge, merge what `phase` needs, and enter it (a fresh quantum)."""
        if phase == self.scheduler.phase and (phase == SHARED) == (self.merged is None):
            self.scheduler.enter(phase)  # the same phase again: without a fresh quantum it could never admit
            return
        if self.merged is not None:
            t0 = time.perf_counter()
            self.merged.restore()
            self.merged = None
            self.metrics.restored(time.perf_counter() - t0)
        if phase != SHARED and not self._merge_for(phase):
            phase = SHARED
        self.scheduler.enter(phase)

    def _merge_for(self, phase: str) -> bool:
        """Merge the adapter of a merged phase; on failure end its waiting requests (base left bit-exact)."""
        adapter = next(r.adapter for r in self.scheduler.waiting if r.phase == phase)
        t0 = time.perf_counter()
        try:
            self.merged = merge(self.base.hf, adapter.parts.lora)
        except HotswapError as exc:
            self._fail_waiting(phase, exc)
            return False
        except Exception as exc:  # noqa: BLE001 - merge rolled back; only this adapter's requests fail
            log.exception("merging %s failed; the base weights were restored", adapter.name)
            self._fail_waiting(phase, RequestFailedError(
                f"merging adapter {adapter.name!r} failed ({describe(exc)}); the base model was restored unchanged"))
            return False
        self.metrics.merged(time.perf_counter() - t0)
        return True
