"""One error, three shapes: the route family decides how a client expects to read it.

- native routes (DESIGN's contract): `{"error": {"type", "message"}}`, our own type names;
- `/v1/*` (OpenAI clients): `{"error": {"message", "type", "param", "code"}}` with OpenAI's type
  names by status, our own type as `code` (`model_not_found` for an unknown adapter, as OpenAI
  says it), and `param` the field at fault when the message starts with one (`max_tokens: ...`);
- LoRAX routes (`lorax-client`): `{"error": message, "error_type": type}`, as LoRAX and TGI send,
  with LoRAX's type names where it has one (`validation`, `overloaded`, `generation`).
"""
from __future__ import annotations

import re

from fastapi.responses import JSONResponse

LORAX_PATHS = ("/lorax/", "/generate_stream")
OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
                422: "invalid_request_error", 429: "rate_limit_error"}
OPENAI_CODES = {"adapter_not_found": "model_not_found"}
LORAX_TYPES = {"invalid_request": "validation", "queue_full": "overloaded", "generation_failed": "generation"}
FIELD_AT_FAULT = re.compile(r"([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*): ")


def error_response(path: str, status: int, type_: str, message: str, headers: dict | None = None) -> JSONResponse:
    """The JSON error for a request to `path`, in that route family's shape."""
    if path.startswith("/v1/"):
        body = {"error": openai_error(status, type_, message)}
    elif path == "/" or path.startswith(LORAX_PATHS):
        body = {"error": message, "error_type": LORAX_TYPES.get(type_, type_)}
    else:
        body = {"error": {"type": type_, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


def openai_error(status: int, type_: str, message: str) -> dict:
    field = FIELD_AT_FAULT.match(message)
    return {
        "message": message,
        "type": OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
        "param": field.group(1) if field else None,
        "code": OPENAI_CODES.get(type_, type_),
    }
