"""What every generation endpoint shares: resolve and check a request, run it, collect or stream it."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

from server.adapters.adapter import Adapter
from server.adapters.composition import Composite, Part
from server.adapters.lora import check_mergeable
from server.api.detokenizer import TextStream
from server.api.drain import Drain
from server.api.schemas import ChatMessage
from server.api.stops import cut_at_stop, streamable
from server.engine.logprobs import TokenLogprob
from server.engine.request import DoneEvent, Event, PromptLogprobsEvent, TokenEvent
from server.engine.sampling import SamplingParams
from server.engine.waiting import Promise
from server.errors import HotswapError, InvalidRequestError

log = logging.getLogger(__name__)
Item = tuple[int | None, str, "Outcome"]  # (token id, new text, running outcome); token id None: the final one
Selection = str | tuple[Part, ...] | None  # what a request runs: an adapter, several (check_parts'), or the base


@dataclass
class Job:
    """A checked request: token ids, sampling, the adapter or combination (acquired) and the mode."""

    prompt_ids: list[int]
    params: SamplingParams
    adapter: Adapter | Composite | None
    mode: str
    cut_stops: bool = True  # the text ends before the stop string that ended it (LoRAX's keeps it)

    @property
    def kind(self) -> str:
        return self.adapter.kind if self.adapter else "base"

    @property
    def adapter_names(self) -> tuple[str, ...]:
        return self.adapter.names if self.adapter else ()

    @property
    def prompt_tokens(self) -> int:
        """What the model processed of the prompt: a soft prompt's virtual tokens, then the prompt's."""
        return (self.adapter.n_virtual if self.adapter else 0) + len(self.prompt_ids)


@dataclass
class Outcome:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per generated token, when asked
    prompt_logprobs: list[TokenLogprob] | None = None  # prompt tokens 1.., when asked
    cached_tokens: int = 0  # prompt tokens whose KV the prompt cache held (engine/prompt_cache.py)


class Generation:
    """Bound to one app: the base model, the registry and the engine."""

    def __init__(self, base, registry, engine, max_new_tokens_limit: int) -> None:
        self.base = base
        self.registry = registry
        self.engine = engine
        self.max_new_tokens_limit = max_new_tokens_limit
        self.drain = Drain()
        # text longer than this cannot fit the context whatever its tokens (none is longer than the
        # vocabulary's longest; twice that for a normalizer that drops characters): refused untokenized
        self.max_prompt_chars = 2 * base.geometry.max_len * max(map(len, base.tokenizer.get_vocab()))

    def check_length(self, chars: int, field: str = "prompt") -> None:
        """Refuse `chars` characters of prompt text before tokenizing them, if no tokenization could fit
        them in the context (tokenizing megabytes to refuse them costs seconds of CPU)."""
        if chars > self.max_prompt_chars:
            raise InvalidRequestError(
                f"{field}: expected at most {self.base.geometry.max_len} tokens (the model's context), got "
                f"{chars} characters, more than that many tokens of this vocabulary can hold")

    def check_turns(self, messages: list[ChatMessage]) -> None:
        """Refuse chat turns before templating them if they could not fit the context: more turns than
        it has positions (each takes at least one token, its role's marker), or too much text."""
        limit = self.base.geometry.max_len
        if len(messages) > limit:
            raise InvalidRequestError(f"messages: expected at most {limit} turns (each takes at least one token "
                                      f"of the model's context), got {len(messages)}")
        self.check_length(sum(len(m.role) + len(m.text()) for m in messages), "messages")

    async def tokenize(self, prompt: str | None, ids: list[int] | None, field: str = "prompt",
                       ids_field: str = "prompt_token_ids") -> list[int]:
        """Token ids of the prompt, checked against the vocabulary; a text prompt is tokenized off the event loop.
        `field` and `ids_field` are the API's names for the prompt text and ids in error messages
        (LoRAX: inputs; OpenAI: prompt for both)."""
        if (prompt is None) == (ids is None):
            got = "both" if prompt is not None else "neither"
            raise InvalidRequestError(f"expected exactly one of prompt (string) or prompt_token_ids (list of ints), got {got}")
        if ids is None:
            self.check_length(len(prompt), field)
            ids = await asyncio.to_thread(self.base.tokenizer.encode, prompt, add_special_tokens=False)
        vocab = self.base.geometry.vocab
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"{ids_field}: expected ids in [0, {vocab}), got {bad[:5]}")
        if not ids:
            raise InvalidRequestError(f"{field if prompt is not None else ids_field}: expected at least one token, "
                                      "got an empty prompt")
        return ids

    async def job(self, selection: Selection, ids: list[int], params: SamplingParams, mode: str | None,
                  limit_name: str = "max_new_tokens") -> Job:
        """Check limits and acquire the adapter(s); the caller must `finish(job)` when done.
        `limit_name` is the API's name for max_new_tokens in error messages (OpenAI: max_tokens)."""
        if params.max_new_tokens > self.max_new_tokens_limit:  # before waiting for an adapter
            raise InvalidRequestError(
                f"{limit_name}: expected at most {self.max_new_tokens_limit}, got {params.max_new_tokens}"
            )
        return self.job_with(await self._acquire(selection), ids, params, mode, limit_name)

    def job_with(self, adapter: Adapter | Composite | None, ids: list[int], params: SamplingParams,
                 mode: str | None, limit_name: str = "max_new_tokens") -> Job:
        """A job on one use of `adapter`, which the caller holds (acquired, or shared by a request's
        later choices, whose max_new_tokens `job` checked with its first): the job's `finish` gives
        it back, and a refusal here releases it."""
        try:
            resolved = adapter.mode_for(mode) if adapter else _base_mode(mode)
            if resolved == "merged":
                check_mergeable(self.base.hf, adapter.parts.lora)
            self._check_context(ids, params, adapter, limit_name)
        except HotswapError:
            if adapter:
                self.registry.release(adapter)
            raise
        return Job(ids, params, adapter, resolved)

    async def _acquire(self, selection: Selection) -> Adapter | Composite | None:
        """The selection's adapter(s), the wait for a resident slot bounded by the shutdown deadline."""
        if selection is None:
            return None
        if isinstance(selection, str):
            return await self.drain.wait(self.registry.acquire(selection))
        return await self.drain.wait(self.registry.acquire_all(selection))

    def _check_context(self, ids: list[int], params: SamplingParams, adapter: Adapter | Composite | None,
                       limit_name: str) -> None:
        n_virtual = adapter.n_virtual if adapter else 0
        total = n_virtual + len(ids) + params.max_new_tokens
        limit = self.base.geometry.max_len
        if total > limit:
            raise InvalidRequestError(
                f"prompt + {limit_name}: expected at most {limit} tokens (the model's context"
                f"{f', incl. {n_virtual} virtual tokens' if n_virtual else ''}), got {total}"
            )

    async def events(self, job: Job, promise: Promise | None = None) -> AsyncIterator[Event]:
        """Submit the job (on a place of `promise`: see engine/waiting.py) and yield its events, each
        wait bounded by the shutdown deadline; closing this (or cancelling a wait) cancels the
        request in the engine, which releases the adapter."""
        source = self.engine.generate(job.prompt_ids, job.params, job.adapter, job.mode, promise)
        async with aclosing(source):
            while True:
                try:
                    event = await self.drain.next(source)
                except StopAsyncIteration:
                    return
                yield event

    async def run(self, job: Job, promise: Promise | None = None) -> Outcome:
        out = Outcome()
        async with aclosing(self.events(job, promise)) as events:
            async for event in events:
                if isinstance(event, DoneEvent):
                    out.finish_reason, out.cached_tokens = self._reason(event), event.cached_tokens
                else:
                    _collect(out, event)
        out.text = await asyncio.to_thread(self.text, out.token_ids, job)
        return out

    async def start(self, job: Job) -> tuple[Item, AsyncGenerator[Item, None]]:
        """Submit a streamed job and await its first item, so that a refusal (a full queue, shutting
        down, a failed merge or prefill) raises here, before any header; then the rest of the items.
        The caller must close the rest (sse.EventStream does)."""
        items = self.stream(job)
        return await anext(items), items  # a failed anext has already finalized `items`

    async def stream(self, job: Job, promise: Promise | None = None) -> AsyncGenerator[Item, None]:
        """Yield (token id, new text, running outcome) per token, then (None, "", final outcome)."""
        out = Outcome()
        sent = ""
        decoded = TextStream(self.base.tokenizer)
        async with aclosing(self.events(job, promise)) as events:
            async for event in events:
                if isinstance(event, DoneEvent):
                    out.finish_reason, out.cached_tokens = self._reason(event), event.cached_tokens
                    break
                _collect(out, event)
                if isinstance(event, PromptLogprobsEvent):
                    continue
                text = decoded.add(event.token_id)
                delta, sent = _delta(streamable(text, job.params.stop) if job.cut_stops else text, sent)
                yield event.token_id, delta, out
        out.text = self.text(out.token_ids, job)
        if not out.text.startswith(sent):
            log.warning("streamed text %r is not a prefix of the decoded output %r", sent[-40:], out.text[-40:])
        yield None, out.text[len(sent):], out

    def text(self, ids: list[int], job: Job) -> str:
        text = self.base.tokenizer.decode(ids, skip_special_tokens=True)
        return cut_at_stop(text, job.params.stop) if job.cut_stops else text

    @staticmethod
    def _reason(event: DoneEvent) -> str:
        if event.finish_reason != "error":
            return event.finish_reason
        if isinstance(event.error, HotswapError):
            raise event.error
        log.error("generation failed", exc_info=event.error)
        raise HotswapError(f"generation failed: {type(event.error).__name__}") from event.error


def _collect(out: Outcome, event: TokenEvent | PromptLogprobsEvent) -> None:
    if isinstance(event, PromptLogprobsEvent):
        out.prompt_logprobs = list(event.scores)
        return
    out.token_ids.append(event.token_id)
    if event.logprob is not None:
        out.logprobs.append(event.logprob)


def _delta(text: str, sent: str) -> tuple[str, str]:
    """The text not yet sent; a trailing partial UTF-8 character waits for the next token."""
    if text.endswith("\ufffd") or not text.startswith(sent):
        return "", sent
    return text[len(sent):], text


def _base_mode(mode: str | None) -> str:
    if mode == "merged":
        raise InvalidRequestError("mode: merged applies to LoRA adapters; this request names no adapter")
    return "none"
