"""The OpenAI request bodies as clients send them: explicit nulls, `n`, `stream_options`, chat logprobs.

They extend the bodies in schemas.py (which keep the sampling fields and their checks).
"""
from __future__ import annotations

from dataclasses import replace

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.api.schemas import ChatBody, CompletionBody
from server.engine.sampling import SamplingParams

MAX_N = 128  # OpenAI's limit on choices per prompt


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
    # OpenAI's fields that hotswap does not implement: accepted where they change nothing (clients send
    # their defaults), refused otherwise, never silently ignored
    best_of: int | None = Field(None, ge=1)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options.include_usage

    @model_validator(mode="after")
    def _unimplemented(self) -> "Choices":
        asks = {"best_of": self.best_of not in (None, self.n), "presence_penalty": self.presence_penalty != 0,
                "frequency_penalty": self.frequency_penalty != 0, "logit_bias": bool(self.logit_bias),
                "suffix": bool(self.suffix)}
        name = next((k for k, asked in asks.items() if asked), None)
        if name is not None:
            raise ValueError(f"{name}: expected it unset, or set so that it changes nothing (hotswap does not "
                             f"implement it), got {getattr(self, name)!r}")
        return self


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
