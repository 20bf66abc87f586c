"""The running batch: its rows in step order and their per-row adapter metadata.

Row i of every decode step is `rows[i]`; `lengths[i]` positions of it are cached, in its blocks.
The per-row adapter plans (LoRA deltas, bottleneck hooks) are built once per batch
composition, not per step: `plans()` rebuilds them only after a join or a leave.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from server.adapters.bottleneck_layer import BottleneckHooks
from server.adapters.lora import LoraPlan
from server.decoder import PLAIN, ResidualHooks
from server.engine.request import Request


@dataclass(frozen=True)
class Plans:
    """What the wrapped layers and hooks read during one forward over a list of rows."""

    lora: LoraPlan | None
    residual: ResidualHooks
    lora_starts: Tensor | None = None  # [N, 1] long: where each row's LoRA applies from; None: everywhere

    @staticmethod
    def build(rows: list[Request]) -> "Plans":
        lora_rows = [r.parts.lora if r.mode == "unmerged" else None for r in rows]
        bn_rows = [r.parts.bottleneck for r in rows]
        lora = LoraPlan.build(lora_rows) if any(lora_rows) else None
        residual = BottleneckHooks.build(bn_rows) if any(bn_rows) else PLAIN
        starts = [r.lora_start if a else 0 for r, a in zip(rows, lora_rows)]  # aLoRA rows: their invocation
        if not any(starts):
            return Plans(lora, residual)
        device = next(iter(lora.modules.values())).device
        return Plans(lora, residual, torch.tensor(starts, device=device)[:, None])

    def gate(self, positions: Tensor) -> Tensor | None:
        """positions: [N, L] -> [N, L, 1] bool, where each row's LoRA applies (aLoRA rows); None: everywhere."""
        return None if self.lora_starts is None else (positions >= self.lora_starts)[..., None]


NO_ADAPTERS = Plans(None, PLAIN)  # the plans of a forward of base rows


def batch_kinds(rows: list[Request]) -> str:
    """The batch's kinds as a canonical label, e.g. `base+bottleneck+lora_unmerged` (a row that
    combines adapters counts each of its kinds)."""
    labels = {f"lora_{r.mode}" if kind == "lora" else kind for r in rows for kind in r.kind.split("+")}
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
