"""Which waiting requests join the batch, and when the merged/unmerged phase changes.

Requests of one phase share a batch: every unmerged request (base, unmerged LoRA,
soft prompt, bottleneck) is phase "shared"; merged-LoRA requests of adapter X are
phase "merged:X#n", alone in the batch while X is folded into the base weights (n: that version
of X, server/adapters/identity.py, so a replaced X's new version never joins its old one's phase).

Fairness: once a request of another phase waits, the current phase admits new
requests for at most `quantum_s` more; then it drains, and the next phase is the
one of the oldest waiting request. FIFO within a phase. Nobody starves.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from server.engine.request import Request

SHARED = "shared"


@dataclass(frozen=True)
class Limits:
    max_rows: int
    max_tokens: int  # KV positions reserved by the running rows: sum of prompt + max_new_tokens
    quantum_s: float


def reserved_tokens(req: Request) -> int:
    n_virtual = req.adapter.n_virtual if req.adapter else 0
    return n_virtual + len(req.prompt_ids) + req.params.max_new_tokens


class Scheduler:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.waiting: deque[Request] = deque()
        self.phase = SHARED
        self._phase_since = time.perf_counter()
        self._contended_since: float | None = None

    def __len__(self) -> int:
        return len(self.waiting)

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def drop_cancelled(self) -> list[Request]:
        gone = [r for r in self.waiting if r.cancelled]
        if gone:
            self.waiting = deque(r for r in self.waiting if not r.cancelled)
        return gone

    def take_phase(self, phase: str) -> list[Request]:
        """Remove and return every waiting request of a phase."""
        taken = [r for r in self.waiting if r.phase == phase]
        self.waiting = deque(r for r in self.waiting if r.phase != phase)
        return taken

    def next_phase(self) -> str:
        """With an empty batch: the phase to run next, the oldest waiting request's."""
        return self.waiting[0].phase if self.waiting else self.phase

    def enter(self, phase: str) -> None:
        self.phase = phase
        self._phase_since = time.perf_counter()
        self._contended_since = None

    def admit(self, running: list[Request]) -> list[Request]:
        """Take the waiting requests of the current phase that fit, FIFO."""
        if not self._may_admit():
            return []
        rows_free = self.limits.max_rows - len(running)
        tokens_free = self.limits.max_tokens - sum(reserved_tokens(r) for r in running)
        chosen: list[Request] = []
        for req in self.waiting:
            if rows_free == 0:
                break
            if req.phase != self.phase:
                continue
            need = reserved_tokens(req)
            if need > tokens_free and (running or chosen):
                break  # FIFO: the next one of this phase waits for room
            chosen.append(req)
            rows_free -= 1
            tokens_free -= need
        for req in chosen:
            self.waiting.remove(req)
        return chosen

    def _may_admit(self) -> bool:
        other_waiting = any(r.phase != self.phase for r in self.waiting)
        if not other_waiting:
            self._contended_since = None
            return True
        now = time.perf_counter()
        if self._contended_since is None:
            self._contended_since = now
        return now - self._contended_since < self.limits.quantum_s
