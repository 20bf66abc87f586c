"""The OpenAI response bodies: envelopes, choices, usage, and the server-sent chunks of a stream.

Usage counts what the model processed: a soft prompt's virtual tokens are prompt tokens, each
prompt is counted once however many samples (`n`) it has, completion tokens are every generated
token (a stop string cut from the text still cost its tokens).
"""
from __future__ import annotations

import json
import time

from server.api.choices import Choice
from server.api.generation import Outcome


def usage(choices: list[Choice], outs: list[Outcome]) -> dict:
    """Each prompt counted once (with the cached tokens of its first choice), every choice's output."""
    seen: set[int] = set()
    n_in = n_cached = 0
    for c, out in zip(choices, outs):
        if c.prompt not in seen:
            seen.add(c.prompt)
            n_in += c.job.prompt_tokens
            n_cached += out.cached_tokens
    n_out = sum(len(o.token_ids) for o in outs)
    return {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out,
            "prompt_tokens_details": {"cached_tokens": n_cached}}


def envelope(rid: str, model: str, chat: bool, choices: list[dict], chunk: bool = False,
             created: int | None = None) -> dict:
    """`created`: the answer's time (a stream's chunks all carry its first one); None: now."""
    kind = "chat.completion" if chat else "text_completion"
    return {"id": rid, "object": f"{kind}.chunk" if chunk and chat else kind,
            "created": int(time.time()) if created is None else created, "model": model,
            "system_fingerprint": None, "choices": choices}


def text_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish_reason}


def chat_delta(index: int, delta: dict, finish_reason: str | None = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


class Chunks:
    """The `data:` lines of one streamed answer, all with the time it began as `created`; with
    include_usage every chunk has `usage: null` and a last chunk with `choices: []` carries the usage
    (OpenAI's stream_options)."""

    def __init__(self, rid: str, model: str, chat: bool, include_usage: bool) -> None:
        self.rid, self.model, self.chat, self.include_usage = rid, model, chat, include_usage
        self.created = int(time.time())

    def choice(self, choice: dict) -> str:
        body = envelope(self.rid, self.model, self.chat, [choice], chunk=True, created=self.created)
        if self.include_usage:
            body["usage"] = None
        return _data(body)

    def usage(self, counts: dict) -> str:
        body = envelope(self.rid, self.model, self.chat, [], chunk=True, created=self.created)
        body["usage"] = counts
        return _data(body)


class StreamRenderer:
    """Renders the interleaved (choice, token id, new text, outcome) items of a stream as chunks:
    chat opens each choice with its role; `strip` drops a chat reply's leading whitespace (no
    template); the last choice's end brings the usage chunk when asked for."""

    def __init__(self, chunks: Chunks, choices: list[Choice], strip: bool) -> None:
        self.chunks, self.choices = chunks, choices
        self.unstarted = {c.index for c in choices} if strip else set()
        self.opened = not chunks.chat
        self.outs: dict[int, Outcome] = {}

    def __call__(self, item: tuple[Choice, int | None, str, Outcome]) -> str:
        c, token_id, delta, out = item
        lines = "" if self.opened else "".join(self.chunks.choice(chat_delta(k.index, {"role": "assistant", "content": ""}))
                                               for k in self.choices)
        self.opened = True
        if c.index in self.unstarted:
            delta = delta.lstrip()
            if delta:
                self.unstarted.discard(c.index)
        if token_id is None:
            self.outs[c.index] = out
            lines += self.chunks.choice(self._piece(c.index, delta, out.finish_reason))
            if self.chunks.include_usage and len(self.outs) == len(self.choices):
                lines += self.chunks.usage(usage(self.choices, [self.outs[k.index] for k in self.choices]))
        elif delta:
            lines += self.chunks.choice(self._piece(c.index, delta, None))
        return lines

    def _piece(self, index: int, text: str, finish_reason: str | None) -> dict:
        if not self.chunks.chat:
            return text_choice(index, text, finish_reason)
        return chat_delta(index, {"content": text} if text else {}, finish_reason)


def _data(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


DONE = "data: [DONE]\n\n"
