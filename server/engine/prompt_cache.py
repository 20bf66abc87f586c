"""The prompt cache: full KV blocks of prompts kept after their request, shared by later requests.

A block of B prompt positions is found again by its chain: the block before it, the context that
computed it and its B tokens. The context is what the KV depends on besides the tokens: the base
model (None), or one adapter or combination with its mode, by identity (an adapter reloaded is a
new context). An activated LoRA's blocks before its invocation are the base model's (alora.py), so
they are cached and found under the base context: a base request's prompt serves the aLoRA
request that extends it, and the other way round; its blocks from the invocation on are keyed by
the invocation's position too (the last full occurrence, which later tokens decide). A soft prompt's virtual positions count as
tokens VIRTUAL, under the soft prompt's context.

A block is shared by reference: rows hold it in their block tables and never write to it (it is
full, and only prompt positions are cached). When no row holds it any more it stays in the pool,
idle, until the pool needs a block: idle blocks are evicted least recently used first, zeroed by the
cache. A chain is keyed by each block's serial (never reused), so a block evicted and handed out
again cannot be taken for the parent of its old children.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

from server.adapters.identity import serial

VIRTUAL = -1  # a soft prompt's virtual position in a chain's tokens
ROOT = -1  # the serial before a prompt's first block

Context = Hashable | None  # None: the base model
Link = tuple[Context, tuple[int, ...]]  # one block: its context and its B tokens
_serials = itertools.count()  # of blocks' entries


def context(adapter: object | None, mode: str) -> Context:
    """What a row's KV depends on besides its tokens."""
    if adapter is None:
        return None
    return serial(adapter), mode


@dataclass(eq=False)
class _Entry:
    key: tuple[int, Context, tuple[int, ...]]  # (parent's serial, context, tokens)
    block: int
    serial: int
    refs: int = 0  # rows holding the block


class PromptCache:
    def __init__(self) -> None:
        self._index: dict[tuple, _Entry] = {}
        self._of: dict[int, _Entry] = {}  # block -> its entry
        self._idle: OrderedDict[int, None] = OrderedDict()  # blocks no row holds, least recently used first

    @property
    def idle_blocks(self) -> int:
        return len(self._idle)

    def holds(self, block: int) -> bool:
        return block in self._of

    def take(self, chain: list[Link], at_least: int = 1) -> list[int]:
        """The blocks of the longest cached start of `chain`, each now held once more by the caller;
        none when fewer than `at_least` are cached."""
        entries: list[_Entry] = []
        parent = ROOT
        for ctx, tokens in chain:
            entry = self._index.get((parent, ctx, tokens))
            if entry is None:
                break
            entries.append(entry)
            parent = entry.serial
        if len(entries) < at_least:
            return []
        for entry in entries:
            self._hold(entry)
        return [entry.block for entry in entries]

    def publish(self, blocks: list[int], chain: list[Link]) -> None:
        """A row's first blocks, computed for `chain`: cache those not cached yet (the row holds them)."""
        parent = ROOT
        for block, (ctx, tokens) in zip(blocks, chain):
            key = (parent, ctx, tokens)
            entry = self._index.get(key)
            if entry is None and block not in self._of:
                entry = self._index[key] = self._of[block] = _Entry(key, block, next(_serials), refs=1)
            elif entry is None:  # a block cached under another chain: not expected; cache no further
                return
            parent = entry.serial  # an equal block computed by another row: this row's stays private

    def release(self, block: int) -> None:
        """A row lets go of a cached block."""
        entry = self._of[block]
        entry.refs -= 1
        if entry.refs == 0:
            self._idle[block] = None

    def evict(self) -> int | None:
        """The least recently used idle block, forgotten (the caller zeroes and reuses it); None if none."""
        if not self._idle:
            return None
        block, _ = self._idle.popitem(last=False)
        entry = self._of.pop(block)
        del self._index[entry.key]
        return block

    def _hold(self, entry: _Entry) -> None:
        if entry.refs == 0:
            del self._idle[entry.block]
        entry.refs += 1
