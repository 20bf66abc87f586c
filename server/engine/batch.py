"""The running batch: its rows in step order and their per-row adapter metadata.

Row i of every decode step is `rows[i]`; `lengths[i]` positions of it are cached, in its blocks.
The per-row adapter plans (LoRA deltas, bottleneck hooks) are built once per batch
composition, not per step: `plans()` rebuilds them only after a join or a leave.
"""
from __future__ import annotations

from dataclasses import dataclass

from server.adapters.bottleneck import BottleneckHooks
from server.adapters.lora import LoraPlan
from server.decoder import PLAIN, ResidualHooks
from server.engine.request import Request


@dataclass(frozen=True)
class Plans:
    """What the wrapped layers and hooks read during one forward over a list of rows."""

    lora: LoraPlan | None
    residual: ResidualHooks

    @staticmethod
    def build(rows: list[Request]) -> "Plans":
        lora_rows = [r.adapter.weights if _is_unmerged_lora(r) else None for r in rows]
        bn_rows = [r.adapter.weights if r.kind == "bottleneck" else None for r in rows]
        lora = LoraPlan.build(lora_rows) if any(lora_rows) else None
        residual = BottleneckHooks.build(bn_rows) if any(bn_rows) else PLAIN
        return Plans(lora, residual)


def _is_unmerged_lora(r: Request) -> bool:
    return r.kind == "lora" and r.mode == "unmerged"


def batch_kinds(rows: list[Request]) -> str:
    """The batch's kinds as a canonical label, e.g. `base+bottleneck+lora_unmerged`."""
    labels = {f"lora_{r.mode}" if r.kind == "lora" else r.kind for r in rows}
    return "+".join(sorted(labels)) or "empty"


class Batch:
    def __init__(self) -> None:
        self.rows: list[Request] = []
        self.lengths: list[int] = []
        self._plans: Plans | None = None
        self._kinds: str | None = None
        self._scored: list[int] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def join(self, req: Request, length: int) -> None:
        """Add a row whose blocks already hold `length` positions."""
        self.rows.append(req)
        self.lengths.append(length)
        self._plans = self._kinds = self._scored = None

    def leave(self, i: int) -> Request:
        """Remove row i, moving the last row into its place (its blocks stay where they are)."""
        req = self.rows[i]
        last = len(self.rows) - 1
        if i != last:
            self.rows[i], self.lengths[i] = self.rows[last], self.lengths[last]
        self.rows.pop()
        self.lengths.pop()
        self._plans = self._kinds = self._scored = None
        return req

    def plans(self) -> Plans:
        if self._plans is None:
            self._plans = Plans.build(self.rows)
        return self._plans

    def kinds(self) -> str:
        if self._kinds is None:
            self._kinds = batch_kinds(self.rows)
        return self._kinds

    def scored(self) -> list[int]:
        """Indices of the rows that asked for generated-token logprobs."""
        if self._scored is None:
            self._scored = scored_rows(self.rows)
        return self._scored


def scored_rows(rows: list[Request]) -> list[int]:
    return [i for i, r in enumerate(rows) if r.params.logprobs is not None]
