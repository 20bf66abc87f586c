"""The OpenAI request bodies as clients send them: explicit nulls, `n`, `stream_options`, chat logprobs.

They extend the bodies in schemas.py (which keep the sampling fields and their checks).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.api.schemas import ChatBody, CompletionBody
from server.engine.sampling import SamplingParams

MAX_N = 128  # OpenAI's limit on choices per prompt

# name -> whether a value (of a body `data`) changes nothing: OpenAI's fields, and the extra fields vLLM
# documents for its OpenAI server (a client moving from vLLM sends them)
UNIMPLEMENTED: dict[str, Callable[[object, dict], bool]] = {
    "best_of": lambda v, data: v == (data.get("n") or 1),
    **{name: (lambda v, data: v == 0) for name in ("presence_penalty", "frequency_penalty", "min_tokens", "min_p")},
    **{name: (lambda v, data: v == 1) for name in ("repetition_penalty", "length_penalty")},
    "response_format": lambda v, data: v == {"type": "text"},
    "modalities": lambda v, data: v == ["text"],
    "verbosity": lambda v, data: v == "medium",
    "add_special_tokens": lambda v, data: v is False,  # hotswap tokenizes prompts without them
    **{name: (lambda v, data: v in ("none", "auto")) for name in ("tool_choice", "function_call")},
    **{name: (lambda v, data: v is True) for name in ("skip_special_tokens", "add_generation_prompt")},
    **{name: (lambda v, data: not v) for name in (
        "logit_bias", "suffix", "tools", "functions", "stop_token_ids", "include_stop_str_in_output",
        "allowed_token_ids", "bad_words", "use_beam_search", "structured_outputs", "return_tokens_as_token_ids",
        "continue_final_message", "chat_template", "chat_template_kwargs", "documents", "audio",
        "truncate_prompt_tokens", "prompt_embeds", "guided_decoding_backend", "prediction", "logits_processors",
        "guided_whitespace_pattern", "vllm_xargs")},
    **{name: (lambda v, data: False) for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar",
                                                  "prompt_logprobs", "reasoning_effort")},  # any value asks for it
}


class NullIsAbsent(BaseModel):
    """An explicit `null` means the field was not sent: its default applies (TGI and many clients send them)."""

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data: object) -> object:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class StreamOptions(NullIsAbsent):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's usage in every chunk: not implemented, refused when true

    @model_validator(mode="after")
    def _implemented(self) -> "StreamOptions":
        if self.continuous_usage_stats:
            raise ValueError("continuous_usage_stats: expected false (hotswap sends the usage once, in the last "
                             "chunk, with include_usage), got true")
        return self


class Choices(NullIsAbsent):
    """What both APIs share: how many choices per prompt and what a stream carries."""

    unimplemented: ClassVar[dict[str, Callable[[object, dict], bool]]] = UNIMPLEMENTED

    n: int = Field(1, ge=1, le=MAX_N)
    stream_options: StreamOptions | None = None

    @model_validator(mode="after")
    def _options_need_a_stream(self) -> "Choices":
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: expected it only with stream: true (as OpenAI), got it with stream: false")
        return self

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @model_validator(mode="before")
    @classmethod
    def _unimplemented(cls, data: object) -> object:
        """OpenAI's and vLLM's fields that hotswap does not implement: accepted where they change nothing
        (clients send their defaults), refused otherwise, never silently ignored."""
        if isinstance(data, dict):
            for name, neutral in cls.unimplemented.items():
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
    unimplemented: ClassVar[dict[str, Callable[[object, dict], bool]]] = {
        **UNIMPLEMENTED, "echo": lambda v, data: not v}  # vLLM's: the last turn before the reply

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
