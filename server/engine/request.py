"""A generation request as the engine sees it, and the events it streams back."""
from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Literal

from server.adapters.alora import row_start
from server.adapters.composition import NO_PARTS, Parts
from server.adapters.identity import serial
from server.engine.cache import BlockTable
from server.engine.logprobs import TokenLogprob
from server.engine.sampling import Sampler, SamplingParams

if TYPE_CHECKING:
    from server.adapters.adapter import Adapter
    from server.adapters.composition import Composite

Mode = Literal["merged", "unmerged", "none"]
FinishReason = Literal["stop", "length", "cancelled", "error"]

_ids = itertools.count()


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    logprob: TokenLogprob | None = None  # only when the request asked for logprobs


@dataclass(frozen=True)
class PromptLogprobsEvent:
    """Scores of prompt tokens 1.. (the first has none), sent once after prefill."""

    scores: tuple[TokenLogprob, ...]


@dataclass(frozen=True)
class DoneEvent:
    finish_reason: FinishReason
    error: Exception | None = None
    cached_tokens: int = 0  # prompt tokens whose KV came from the prompt cache


Event = TokenEvent | PromptLogprobsEvent | DoneEvent


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    adapter: "Adapter | Composite | None"
    mode: Mode
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    id: int = field(default_factory=lambda: next(_ids))
    arrived: float = field(default_factory=time.perf_counter)
    admitted: float | None = None
    first_token: float | None = None
    output_ids: list[int] = field(default_factory=list)
    cancelled: bool = False
    sampler: Sampler | None = None
    failure: Exception | None = None  # set by the engine when this row must end with an error
    finished: bool = False  # its DoneEvent was sent and its adapter released (exactly once)
    kv: BlockTable = field(default_factory=BlockTable)  # its KV-cache blocks; returned when it finishes
    cached_tokens: int = 0  # prompt tokens whose KV came from the prompt cache (engine/prompt_cache.py)

    @property
    def kind(self) -> str:
        return self.adapter.kind if self.adapter else "base"

    @property
    def parts(self) -> Parts:
        return self.adapter.parts if self.adapter else NO_PARTS

    @property
    def adapter_names(self) -> tuple[str, ...]:
        """The registered adapters it runs: a combination's members, each by its own name."""
        return self.adapter.names if self.adapter else ()

    @property
    def n_virtual(self) -> int:
        """A soft prompt's virtual positions before the prompt's (0 without one)."""
        return self.adapter.n_virtual if self.adapter else 0

    @cached_property
    def lora_start(self) -> int:
        """The first row position where this row's LoRA applies: 0, or an aLoRA's invocation (alora.py)."""
        lora = self.parts.lora
        invocation = lora.spec.alora_invocation_tokens if lora else ()
        return row_start(self.prompt_ids, invocation, self.n_virtual)

    @cached_property
    def phase(self) -> str:
        """Requests of one phase may share a batch: all unmerged ones, or one merged adapter's, by
        identity (a replaced adapter's new version is another phase than its old one's, still merged).
        Read for every waiting request at each admission, and fixed by its adapter and mode: kept."""
        if self.mode == "merged" and self.adapter:
            return f"merged:{self.adapter.name}#{serial(self.adapter)}"
        return "shared"
