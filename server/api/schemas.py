"""Request bodies of the HTTP API (native and OpenAI-compatible)."""
from __future__ import annotations

from dataclasses import replace
from typing import Annotated, ClassVar, Literal

from pydantic import (BaseModel, ConfigDict, Field, StrictInt, StrictStr, StringConstraints, field_validator,
                      model_validator)

from server.adapters.composition import MAX_PARTS, Part, check_parts
from server.engine.sampling import SamplingParams
from server.errors import InvalidRequestError

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # the range torch.Generator.manual_seed accepts
MAX_STOPS, MAX_STOP_CHARS = 64, 1000  # stop strings of a request: each streamed token is checked against them all
StopText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]  # "" would stop at once
Stops = Annotated[list[StopText], Field(max_length=MAX_STOPS)]


def encodable(value: object) -> object:
    """Refuse text UTF-8 cannot encode (a lone surrogate, e.g. JSON "\\ud800"), in strings, lists and dicts."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"expected text UTF-8 can encode, got a lone surrogate {value[exc.start]!r} at index {exc.start}") from None
    elif isinstance(value, list | tuple):
        for item in value:
            encodable(item)
    elif isinstance(value, dict):
        for item in value.values():
            encodable(item)
    return value


class KnownFields(BaseModel):
    """Refuses body fields that would change the request's meaning if they were dropped: `misplaced`
    names where each of those goes; with `strict`, every field the body does not define is refused."""

    misplaced: ClassVar[dict[str, str]] = {}
    strict: ClassVar[bool] = False

    @model_validator(mode="before")
    @classmethod
    def _known(cls, data: object) -> object:
        for key in data if isinstance(data, dict) else ():
            if key in cls.model_fields:
                continue
            if key in cls.misplaced:
                raise InvalidRequestError(f"{key}: expected {cls.misplaced[key]}, got {key!r} in the body")
            if cls.strict:
                raise InvalidRequestError(f"{key}: expected only the fields {', '.join(cls.model_fields)}, "
                                          f"got {key!r}, which this endpoint does not define")
        return data


class AdapterEntry(BaseModel):
    """One adapter of a request's `adapters` list."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    _utf8 = field_validator("*")(encodable)

    name: str
    weight: float = 1.0


class SamplingFields(KnownFields):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)  # NaN and ±inf are refused in every float field
    misplaced: ClassVar[dict[str, str]] = {
        name: "the adapter as `model` (several: an `adapters` list of {name, weight})"
        for name in ("adapter", "adapter_id", "adapter_name", "lora", "lora_name", "lora_request")
    }

    _utf8 = field_validator("*")(encodable)

    temperature: float = Field(0.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: StopText | Stops | None = None
    ignore_eos: bool = False

    def params(self, max_new_tokens: int) -> SamplingParams:
        stops = () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=tuple(s for s in stops if s),
            ignore_eos=self.ignore_eos,
        )


class Composable(BaseModel):
    """Requests that may combine adapters: `adapters`, a list of {name, weight}."""

    adapters: list[AdapterEntry] | None = Field(None, min_length=1, max_length=MAX_PARTS)

    def parts(self) -> tuple[Part, ...] | None:
        """The list as composition.check_parts gives it, None without one."""
        return None if self.adapters is None else check_parts([Part(a.name, a.weight) for a in self.adapters])


class GenerateBody(Composable, SamplingFields):
    strict: ClassVar[bool] = True  # our own API: a field it does not define is a mistake, never ignored
    misplaced: ClassVar[dict[str, str]] = {
        name: "the adapter in the query, POST /generate?adapter=NAME (several: an `adapters` list of {name, weight})"
        for name in ("adapter", "adapter_id", "adapter_name", "lora", "lora_name", "lora_request", "model")
    }

    prompt: str | None = None
    prompt_token_ids: list[StrictInt] | None = None
    max_new_tokens: int = Field(16, ge=1)
    stream: bool = False
    mode: Literal["merged", "unmerged"] | None = None


class CompletionBody(Composable, SamplingFields):
    model: str
    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]]
    max_tokens: int = Field(16, ge=0)  # 0 only with echo: score the prompt, generate nothing
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    stream: bool = False
    n: int = Field(1, ge=1, le=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    user: str | None = None

    def params(self, max_new_tokens: int) -> SamplingParams:
        """Sampling plus scoring: `logprobs` for the generated tokens, and for the prompt's when echoed."""
        prompt = self.logprobs if self.echo else None
        return replace(super().params(max_new_tokens), logprobs=self.logprobs, prompt_logprobs=prompt)


class TextPart(BaseModel):
    """One part of a message's content: this server serves text models, so text parts only."""

    model_config = ConfigDict(extra="ignore")

    _utf8 = field_validator("*")(encodable)

    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    _utf8 = field_validator("*")(encodable)

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatBody(Composable, SamplingFields):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    stream: bool = False
    n: int = Field(1, ge=1, le=1)
    user: str | None = None

    def limit(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default
