"""The OpenAI request bodies as clients send them: explicit nulls, `n`, `stream_options`, chat logprobs.

They extend the bodies in schemas.py (which keep the sampling fields and their checks).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.api.schemas import ChatBody, CompletionBody
from server.engine.sampling import SamplingParams

MAX_N = 128  # OpenAI's limit on choices per prompt

# name -> whether a value (of a body `data`) changes nothing
UNIMPLEMENTED: dict[str, Callable[[object, dict], bool]] = {
    "best_of": lambda v, data: v == data.get("n", 1),
    **{name: (lambda v, data: v == 0) for name in ("presence_penalty", "frequency_penalty", "min_tokens", "min_p")},
    "repetition_penalty": lambda v, data: v == 1,
    "response_format": lambda v, data: v == {"type": "text"},
    **{name: (lambda v, data: v in ("none", "auto")) for name in ("tool_choice", "function_call")},
    **{name: (lambda v, data: not v) for name in ("logit_bias", "suffix", "tools", "functions", "stop_token_ids")},
    **{name: (lambda v, data: False) for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar")},
}


class NullIsAbsent(BaseModel):
    """An explicit `null` means the field was not sent: its default applies (TGI and many clients send them)."""

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data: object) -> object:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class StreamOptions(NullIsAbsent):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class Choices(NullIsAbsent):
    """What both APIs share: how many choices per prompt and what a stream carries."""

    n: int = Field(1, ge=1, le=MAX_N)
    stream_options: StreamOptions = Field(default_factory=StreamOptions)

    @property
    def include_usage(self) -> bool:
        return self.stream_options.include_usage

    @model_validator(mode="before")
    @classmethod
    def _unimplemented(cls, data: object) -> object:
        """OpenAI's and vLLM's fields that hotswap does not implement: accepted where they change nothing
        (clients send their defaults), refused otherwise, never silently ignored."""
        if isinstance(data, dict):
            for name, neutral in UNIMPLEMENTED.items():
                if data.get(name) is not None and not neutral(data[name], data):
                    raise ValueError(f"{name}: expected it unset, or set so that it changes nothing (hotswap does "
                                     f"not implement it), got {data[name]!r}")
        return data


class CompletionRequest(Choices, CompletionBody):
    """`prompt`: a string, a list of token ids, or a batch of either (one choice per prompt, in order)."""

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class ChatRequest(Choices, ChatBody):
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> "ChatRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError(f"top_logprobs: expected logprobs: true with it, got logprobs: false and top_logprobs: {self.top_logprobs}")
        return self

    def params(self, max_new_tokens: int) -> SamplingParams:
        n_top = (self.top_logprobs or 0) if self.logprobs else None
        return replace(super().params(max_new_tokens), logprobs=n_top)
