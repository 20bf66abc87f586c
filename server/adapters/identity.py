"""A serial for each adapter object while it lives, never reused: what tells apart two versions of
one name (a replace leaves the old one alive until its requests end) or two builds of one
combination, where the weights, not the name, decide what a row computes."""
from __future__ import annotations

import itertools
import weakref

_serials = itertools.count()
_of: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # adapter -> its serial


def serial(adapter: object) -> int:
    """`adapter`'s serial (an Adapter or a Composite: hashed by identity)."""
    found = _of.get(adapter)
    if found is None:
        found = _of[adapter] = next(_serials)
    return found
