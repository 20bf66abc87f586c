"""Scheduler: phases keep merged adapters alone in the batch, FIFO within a phase, nobody starves."""
from __future__ import annotations

import time
from dataclasses import dataclass

from server.engine.sampling import SamplingParams
from server.engine.scheduler import SHARED, Limits, Scheduler


@dataclass
class FakeAdapter:
    name: str
    kind: str = "lora"
    n_virtual: int = 0


@dataclass(eq=False)
class FakeRequest:
    adapter: FakeAdapter | None
    mode: str
    prompt_ids: tuple = (1, 2, 3)
    params: SamplingParams = SamplingParams(max_new_tokens=10)
    cancelled: bool = False

    @property
    def phase(self) -> str:
        return f"merged:{self.adapter.name}" if self.mode == "merged" else SHARED


def _sched(quantum_s: float = 60.0, rows: int = 4, tokens: int = 1000) -> Scheduler:
    return Scheduler(Limits(max_rows=rows, max_tokens=tokens, quantum_s=quantum_s))


def test_shared_requests_fill_rows_fifo():
    s = _sched(rows=3)
    reqs = [FakeRequest(None, "none") for _ in range(5)]
    for r in reqs:
        s.add(r)
    assert s.admit([]) == reqs[:3]
    assert s.admit(reqs[:2]) == [reqs[3]]


def test_merged_requests_wait_for_their_phase():
    s = _sched()
    base, merged = FakeRequest(None, "none"), FakeRequest(FakeAdapter("a"), "merged")
    s.add(base)
    s.add(merged)
    assert s.admit([]) == [base]
    assert s.admit([base]) == []  # the merged request may not join a shared batch
    assert s.next_phase() == "merged:a"
    s.enter("merged:a")
    assert s.admit([]) == [merged]


def test_two_merged_adapters_never_share_a_batch():
    s = _sched()
    a1, b1, a2 = (FakeRequest(FakeAdapter(n), "merged") for n in ("a", "b", "a"))
    for r in (a1, b1, a2):
        s.add(r)
    s.enter(s.next_phase())
    assert s.admit([]) == [a1, a2]
    s.enter(s.next_phase())
    assert s.phase == "merged:b" and s.admit([]) == [b1]


def test_phase_stops_admitting_after_quantum_when_others_wait():
    s = _sched(quantum_s=0.05, rows=100)
    s.add(FakeRequest(FakeAdapter("a"), "merged"))
    running = []
    s.add(FakeRequest(None, "none"))
    running += s.admit(running)  # shared phase starts with the shared request; merged waits
    assert len(running) == 1
    time.sleep(0.06)
    s.add(FakeRequest(None, "none"))
    assert s.admit(running) == []  # quantum spent: drain so the merged request gets its turn
    assert s.next_phase() == "merged:a"


def test_token_budget_bounds_admission_but_never_blocks_an_empty_batch():
    s = _sched(tokens=20)
    big = FakeRequest(None, "none", params=SamplingParams(max_new_tokens=50))
    small = FakeRequest(None, "none")
    s.add(big)
    s.add(small)
    assert s.admit([]) == [big]
    assert s.admit([big]) == []


def test_cancelled_waiting_requests_are_dropped():
    s = _sched()
    keep, gone = FakeRequest(None, "none"), FakeRequest(None, "none", cancelled=True)
    s.add(keep)
    s.add(gone)
    assert s.drop_cancelled() == [gone]
    assert list(s.waiting) == [keep]
