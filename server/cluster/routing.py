"""Which adapter a request names, as Ray Serve's multiplexed model id ("" for the base model).

`/generate?adapter=NAME` names it in the query; the OpenAI completions and chat endpoints in the
JSON body's `model`, where the base model's own name means no adapter. Everything else (adapter
management, health, metrics) names none and may go to any replica.
"""
from __future__ import annotations

import json
from urllib.parse import parse_qs

MODEL_IN_BODY = frozenset({"/v1/completions", "/v1/chat/completions"})


def adapter_of(path: str, query_string: bytes, body: bytes, base_name: str) -> str:
    if path == "/generate":
        return parse_qs(query_string.decode("latin-1")).get("adapter", [""])[0]
    if path in MODEL_IN_BODY:
        model = _json_field(body, "model")
        return "" if model == base_name else model
    return ""


def _json_field(body: bytes, name: str) -> str:
    """The body's string field, or "" when the body is not a JSON object with one (the replica answers 400)."""
    try:
        value = json.loads(body).get(name)
    except (ValueError, AttributeError):
        return ""
    return value if isinstance(value, str) else ""
