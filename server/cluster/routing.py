"""Which adapter a request names, as Ray Serve's multiplexed model id ("" for the base model).

`/generate?adapter=NAME` names it in the query; the OpenAI completions and chat endpoints in the
JSON body's `model`, where the base model's own name means no adapter; LoRAX's bodies (`POST /`,
`/generate_stream`, `/generate` with `inputs`) in `parameters.adapter_id`. Everything else
(combinations, adapter management, health, metrics) names none and may go to any replica.
"""
from __future__ import annotations

import json
from urllib.parse import parse_qs

from server.api.lorax import is_lorax_object

MODEL_IN_BODY = frozenset({"/v1/completions", "/v1/chat/completions"})
LORAX_ROUTES = frozenset({"/", "/generate_stream"})


def adapter_of(path: str, query_string: bytes, body: bytes, base_name: str) -> str:
    if path not in LORAX_ROUTES | MODEL_IN_BODY and path != "/generate":
        return ""
    data = _json_object(body)  # parsed once
    if path in LORAX_ROUTES or (path == "/generate" and is_lorax_object(data)):
        named = _field(_field(data, "parameters", dict), "adapter_id")
    elif path == "/generate":
        named = parse_qs(query_string.decode("latin-1")).get("adapter", [""])[0]
    else:
        named = _field(data, "model")
    return "" if named == base_name else named


def _json_object(body: bytes) -> dict:
    """The body's JSON object, or {} where it is none (the replica answers the body's faults)."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _field(data: dict, name: str, kind: type = str):
    """`data[name]`, or an empty `kind` where it has none of that type."""
    value = data.get(name)
    return value if isinstance(value, kind) else kind()
