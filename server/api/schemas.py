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
ADAPTER_FIELDS = ("adapter", "adapter_id", "adapter_name", "lora", "lora_name", "lora_request")  # other servers' names


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

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

    _utf8 = field_validator("*")(encodable)

    name: str
    weight: float = 1.0


class SamplingFields(KnownFields):
    # NaN and ±inf are refused in every float field; no value of another JSON type is converted ("5" for
    # an int, 1 for a bool), as OpenAI refuses them; an int stands for a float
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)
    misplaced: ClassVar[dict[str, str]] = {
        name: "the adapter as `model` (several: an `adapters` list of {name, weight})" for name in ADAPTER_FIELDS
    }

    _utf8 = field_validator("*")(encodable)

    temperature: float = Field(0.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)  # 0 and -1 (vLLM's older "off"): every token
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: StopText | Stops | None = None
    ignore_eos: bool = False

    def params(self, max_new_tokens: int) -> SamplingParams:
        stops = () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=max(self.top_k, 0),
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


class Moded(BaseModel):
    """Requests that may choose how a LoRA runs: `mode` merged or unmerged (None: the adapter's default)."""

    mode: Literal["merged", "unmerged"] | None = None


class OpenAIFields(SamplingFields):
    """What the OpenAI bodies share: /generate's own names for their fields are refused with the OpenAI
    name, since dropping them would change the request."""

    misplaced: ClassVar[dict[str, str]] = {
        **SamplingFields.misplaced,
        "max_new_tokens": "max_tokens",
        "prompt_token_ids": "the token ids as `prompt` (completions)",
    }


class GenerateBody(Moded, Composable, SamplingFields):
    strict: ClassVar[bool] = True  # our own API: a field it does not define is a mistake, never ignored
    misplaced: ClassVar[dict[str, str]] = {
        name: "the adapter in the query, POST /generate?adapter=NAME (several: an `adapters` list of {name, weight})"
        for name in (*ADAPTER_FIELDS, "model")
    }

    prompt: str | None = None
    prompt_token_ids: list[StrictInt] | None = None
    max_new_tokens: int = Field(16, ge=1)
    stream: bool = False


class CompletionBody(Moded, Composable, OpenAIFields):
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

    model_config = ConfigDict(extra="ignore", strict=True)

    _utf8 = field_validator("*")(encodable)

    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    """One turn. `name` and `tool_call_id` go to the chat template with it; tool calls are refused (the
    server runs no tools, and a template would drop them)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    _utf8 = field_validator("*")(encodable)

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list | None = None
    function_call: dict | None = None

    @model_validator(mode="after")
    def _checked(self) -> "ChatMessage":
        if self.tool_calls or self.function_call:
            field = "tool_calls" if self.tool_calls else "function_call"
            raise ValueError(f"{field}: expected none (hotswap runs no tools), got {field} in the turn")
        if self.content is None and self.role != "assistant":
            raise ValueError(f"content: expected text in a {self.role} turn (only an assistant turn may have "
                             "none), got none")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def turn(self) -> dict:
        """The turn as a chat template reads it."""
        extra = {k: v for k, v in (("name", self.name), ("tool_call_id", self.tool_call_id)) if v is not None}
        return {"role": self.role, "content": self.text(), **extra}


class ChatBody(Moded, Composable, OpenAIFields):
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

    @property
    def limit_name(self) -> str:
        """The field `limit` came from, as errors name it."""
        return "max_completion_tokens" if self.max_completion_tokens else "max_tokens"
