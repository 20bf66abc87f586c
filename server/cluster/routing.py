"""Which adapter a request names, as Ray Serve's multiplexed model id ("" for the base model).

`/generate?adapter=NAME` names it in the query; the OpenAI completions and chat endpoints in the
JSON body's `model`, where the base model's own name means no adapter; LoRAX's bodies (`POST /`,
`/generate_stream`, `/generate` with `inputs`) in `parameters.adapter_id`. Everything else
(combinations, adapter management, health, metrics) names none and may go to any replica.
"""
from __future__ import annotations

import json
from urllib.parse import parse_qs

from server.api.lorax import is_lorax_body

MODEL_IN_BODY = frozenset({"/v1/completions", "/v1/chat/completions"})
LORAX_ROUTES = frozenset({"/", "/generate_stream"})


def adapter_of(path: str, query_string: bytes, body: bytes, base_name: str) -> str:
    if path in LORAX_ROUTES or (path == "/generate" and is_lorax_body(body)):
        named = _json_field(_json_field(body, "parameters", dict), "adapter_id")
    elif path == "/generate":
        named = parse_qs(query_string.decode("latin-1")).get("adapter", [""])[0]
    elif path in MODEL_IN_BODY:
        named = _json_field(body, "model")
    else:
        return ""
    return "" if named == base_name else named


def _json_field(body: bytes | dict, name: str, kind: type = str):
    """The field of a JSON object (its bytes, or the object), or an empty `kind` where it has none of
    that type (the replica answers the body's faults)."""
    try:
        value = (json.loads(body) if isinstance(body, bytes) else body).get(name)
    except (ValueError, AttributeError, RecursionError):
        return kind()
    return value if isinstance(value, kind) else kind()
