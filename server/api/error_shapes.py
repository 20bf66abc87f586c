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
# the field a message starts with (`prompt + max_tokens: ...`: max_tokens, the one a client would change)
FIELD_AT_FAULT = re.compile(r"(?:prompt \+ )?([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*): ")


def error_response(path: str, status: int, type_: str, message: str, headers: dict | None = None) -> JSONResponse:
    """The JSON error for a request to `path`, in that route family's shape."""
    return JSONResponse(error_body(path, status, type_, message), status_code=status, headers=headers)


def error_body(path: str, status: int, type_: str, message: str) -> dict:
    """An error in the shape of `path`'s route family: a response's body, or a stream's last event."""
    if path.startswith("/v1/"):
        return {"error": openai_error(status, type_, message)}
    if path == "/" or path.startswith(LORAX_PATHS):
        return {"error": message, "error_type": LORAX_TYPES.get(type_, type_)}
    return {"error": {"type": type_, "message": message}}


def openai_error(status: int, type_: str, message: str) -> dict:
    field = FIELD_AT_FAULT.match(message)
    return {
        "message": message,
        "type": OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
        "param": field.group(1) if field else None,
        "code": OPENAI_CODES.get(type_, type_),
    }
