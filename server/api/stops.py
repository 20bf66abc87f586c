"""Stop strings: cut the text at the first one, and hold back streamed text that may begin one.

A stream may only send text that no later token can turn into part of a stop string, so that the
streamed text always equals the text of the JSON answer: the longest tail of the text that is a
proper prefix of some stop string waits until the next token settles it.
"""
from __future__ import annotations


def cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    """The text before the first occurrence of any stop string (all of it when none occurs)."""
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return text[:cut] if cut >= 0 else text


def streamable(text: str, stops: tuple[str, ...]) -> str:
    """Of the text decoded so far, what a stream may send now: all of it up to a stop string that
    occurred (the text is final then), else all but a tail that may begin one."""
    cut = cut_at_stop(text, stops)
    return cut if len(cut) < len(text) else sendable(text, stops)


def sendable(text: str, stops: tuple[str, ...]) -> str:
    """The part of `text` (in which no stop string occurs) that is safe to stream now."""
    return text[: len(text) - held_back(text, stops)]


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest
