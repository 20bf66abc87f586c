"""Slots: a batch's distinct adapters numbered in order of first use, and each row's number.

The slot kernels (LoRA deltas, bottleneck sites) read each row's adapter through its slot: a join or
a leave renumbers a few integers and copies no weights."""
from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")


def assign_slots(rows: list[T | None]) -> tuple[list[T], list[int]]:
    """The distinct adapters of `rows` by identity, in order of first use (slot k: the k-th), and each
    row's slot (-1 where it has none)."""
    distinct = list({id(a): a for a in rows if a is not None}.values())
    slot_of = {id(a): k for k, a in enumerate(distinct)}
    return distinct, [-1 if a is None else slot_of[id(a)] for a in rows]
