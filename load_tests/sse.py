"""Server-sent events: lines in, decoded JSON payloads out.

Tolerant of `\r\n` endings, comments, `event:`/`id:` fields, multi-line `data:`, a missing blank
line between events, and the `[DONE]` sentinel some servers send last.
"""
from __future__ import annotations

import json
from enum import Enum
from typing import Any

DONE_SENTINEL = "[DONE]"


class EventKind(Enum):
    TOKEN = "token"
    FINAL = "final"
    ERROR = "error"


class SseDecoder:
    """Feed lines one at a time; complete events come back as decoded JSON objects."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> list[dict[str, Any]]:
        line = line.rstrip("\r\n")
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return []
        field, _, value = line.partition(":")
        if field != "data":
            return []
        value = value[1:] if value.startswith(" ") else value
        # A new data line after a complete JSON object: the blank separator line was left out.
        events = self._dispatch() if self._data and _parses("\n".join(self._data)) else []
        self._data.append(value)
        return events

    def close(self) -> list[dict[str, Any]]:
        return self._dispatch()

    def _dispatch(self) -> list[dict[str, Any]]:
        text = "\n".join(self._data).strip()
        self._data = []
        if not text or text == DONE_SENTINEL:
            return []
        payload = json.loads(text)
        return [payload] if isinstance(payload, dict) else [{"value": payload}]


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def decode_lines(lines: list[str]) -> list[dict[str, Any]]:
    decoder = SseDecoder()
    events = [event for line in lines for event in decoder.feed(line)]
    return events + decoder.close()


def classify(event: dict[str, Any]) -> EventKind:
    if "error" in event:
        return EventKind.ERROR
    if event.get("usage") is not None and event.get("finish_reason") is not None:
        return EventKind.FINAL
    return EventKind.TOKEN


def tokens_in(event: dict[str, Any]) -> int:
    """How many generated tokens a token event carries (one unless it lists several)."""
    ids = event.get("token_ids")
    return len(ids) if isinstance(ids, list) else 1
