"""The typed errors a request ends with when a stage of the engine fails for it."""
from __future__ import annotations

from server.engine.request import Request
from server.errors import HotswapError, NonFiniteLogitsError, RequestFailedError

MESSAGE_LIMIT = 300  # characters of an exception's text that reach the client


def describe(exc: BaseException) -> str:
    """`Type: message`, cut to MESSAGE_LIMIT characters."""
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 3] + "..."


def failed(stage: str, exc: Exception) -> HotswapError:
    """The error a request gets when `stage` raised for it (a typed error passes through)."""
    if isinstance(exc, HotswapError):
        return exc
    return RequestFailedError(f"{stage} failed for this request ({describe(exc)}); other requests were not affected")


def step_failed(exc: Exception) -> HotswapError:
    """The error of each row of a step that raised where no single row could be blamed."""
    if isinstance(exc, HotswapError):
        return exc
    return RequestFailedError(f"the engine step failed ({describe(exc)}) where no single request could be blamed; "
                              "the requests in that step ended, the waiting ones were not affected")


def non_finite(req: Request) -> NonFiniteLogitsError:
    """The error of a row whose logits came out NaN or infinite, naming its adapter."""
    if req.adapter is None:
        who = "the base model"
    else:
        mode = f", {req.mode}" if req.parts.lora else ""
        who = f"adapter {req.adapter.name!r} ({req.kind}{mode})"
    return NonFiniteLogitsError(
        f"logits: expected finite values, got NaN or inf from {who} at output token {len(req.output_ids) + 1}; "
        "its weights overflow the activations on this input")
