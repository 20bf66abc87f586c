"""Typed domain errors and their HTTP mapping.

Every error names what was expected and what was received; the API layer turns
each into `{"error": {"type": ..., "message": ...}}` with the status below.
"""
from __future__ import annotations

import re

MAX_ECHO_CHARS = 200  # longest value an error message repeats back


def clip(value: object, limit: int = MAX_ECHO_CHARS) -> str:
    """`repr(value)`, cut to `limit` characters with a note of its full length (error bodies never echo megabytes)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters in all)"


def clip_text(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """Text (a name, a library's message) cut like `clip`, without quotes."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters in all)"


_ABSOLUTE_PATH = re.compile(r"/(?:[^/\s'\"]+/)+(?=[^/\s'\"])")


def strip_paths(text: str) -> str:
    """A library's message with every absolute path cut to its last part: files named as in their folder."""
    return _ABSOLUTE_PATH.sub("", text)


class HotswapError(Exception):
    """Base of every error the server reports to a client."""

    status = 500
    type = "internal_error"
    retry_after_s: int | None = None  # set where a retry after that long may succeed: sent as Retry-After

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def headers(self) -> dict[str, str] | None:
        """The response headers this error comes with."""
        return {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else None


class InvalidRequestError(HotswapError):
    """The request is malformed or out of range (400)."""

    status = 400
    type = "invalid_request"


class AuthenticationError(HotswapError):
    """No or malformed credentials (401)."""

    status = 401
    type = "unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}  # RFC 9110: a 401 names the scheme it takes


class ForbiddenError(HotswapError):
    """Credentials given but wrong (403)."""

    status = 403
    type = "forbidden"


class AdapterNotFoundError(HotswapError):
    """The named adapter is not registered (404)."""

    status = 404
    type = "adapter_not_found"

    def __init__(self, name: str) -> None:
        super().__init__(f"adapter {clip(name)} is not registered; GET /adapters lists the registered ones")
        self.name = name


class AdapterExistsError(HotswapError):
    """An adapter of that name exists and `replace` was not asked for (409)."""

    status = 409
    type = "adapter_exists"


class MergeConflictError(HotswapError):
    """A merge was asked for while another adapter is merged into the same model (409)."""

    status = 409
    type = "merge_conflict"


class PayloadTooLargeError(HotswapError):
    """An upload exceeds the configured limit (413)."""

    status = 413
    type = "payload_too_large"


class UnsupportedMediaTypeError(HotswapError):
    """A JSON route's body sent as another content-type (415)."""

    status = 415
    type = "unsupported_media_type"


class AdapterFormatError(HotswapError):
    """Adapter files that cannot be served on this base model (422).

    `field` names the config field or tensor key at fault.
    """

    status = 422
    type = "invalid_adapter"

    def __init__(self, field: str, expected: str, got: object) -> None:
        super().__init__(f"{clip_text(field)}: expected {clip_text(expected, 4 * MAX_ECHO_CHARS)}, got {clip(got)}")
        self.field = field


class QueueFullError(HotswapError):
    """Too many requests waiting (429); the client should retry later."""

    status = 429
    type = "queue_full"

    def __init__(self, waiting: int, retry_after_s: int = 1) -> None:
        super().__init__(f"queue is full ({waiting} requests waiting); retry after {retry_after_s}s")
        self.retry_after_s = retry_after_s


class ShuttingDownError(HotswapError):
    """The server is draining and accepts no new requests (503)."""

    status = 503
    type = "shutting_down"
    retry_after_s = 1  # another replica, or this one restarted


class AdapterCapacityError(HotswapError):
    """No resident slot can be freed for the adapter now (every one is pinned or in use) (503).
    Only a wait for slots in use that timed out says when to retry; pins change by an operator's hand."""

    status = 503
    type = "adapter_capacity"

    def __init__(self, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class StoreCorruptError(HotswapError):
    """A stored adapter's files do not match its manifest, or its manifest does not account for them (500:
    the server's disk, not the request). It is listed with status `corrupt`, can be deleted or replaced,
    and is never served."""

    status = 500
    type = "store_corrupt"


class AdapterLoadError(HotswapError):
    """A registered adapter's files could not be read back from the store (500)."""

    status = 500
    type = "adapter_load_failed"


class RequestFailedError(HotswapError):
    """The engine could not compute this request (an exception in its prefill, decode, sampling or
    merge); every other request goes on (500)."""

    status = 500
    type = "generation_failed"


class NonFiniteLogitsError(HotswapError):
    """The model with this request's adapter produced NaN or infinite logits (422): its weights
    overflow the activations on this input."""

    status = 422
    type = "non_finite_logits"
