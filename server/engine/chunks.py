"""Chunked prefill: a prompt longer than one chunk is fed a chunk per engine step, between decode
steps, so the streams already decoding never stall behind it for its whole prefill.

One such prompt is in progress at a time, in its own cache blocks (admission counts every chunked
request as a running row); the others queue here in arrival order. While no row decodes, the
chunks are --max-prefill-tokens long: nobody waits on them. When its last chunk is in, the request
joins the batch with its blocks as they are and the first token sampled from the last chunk's
logits. Requests that score their prompt (`prompt_logprobs`) are prefilled in one piece, as before.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
from torch import Tensor

from server.engine.prefill import Prefiller
from server.engine.request import Request


def chunk_tokens(setting: int, device: torch.device) -> int:
    """0 (auto): 512 on CUDA; 32 on CPU, where a 32-token chunk of the 75M bench model costs about
    two 8-row decode steps (BENCHMARKS.md), which keeps a decoding stream's largest gap near 3x."""
    return setting or (512 if device.type == "cuda" else 32)


@dataclass
class InProgress:
    req: Request
    start: int  # positions of its row cached so far
    inputs: Tensor | None  # [L, H] embeddings not yet fed; None until its row is begun


@dataclass(frozen=True)
class Prefilled:
    req: Request
    length: int  # positions cached
    logits: Tensor  # [1, V] after its last prompt token


class ChunkedPrefill:
    def __init__(self, prefiller: Prefiller, chunk_tokens: int, alone_tokens: int) -> None:
        self.prefiller = prefiller
        self.chunk_tokens = chunk_tokens  # per step while other rows decode
        self.alone_tokens = max(alone_tokens, chunk_tokens)  # per step when no row decodes: nobody to stall
        self.queue: deque[Request] = deque()
        self.active: InProgress | None = None

    def __len__(self) -> int:
        return len(self.queue) + (self.active is not None)

    def requests(self) -> list[Request]:
        """Every request here, the one in progress first (also read by metrics scrapes on the event loop)."""
        active = self.active  # read once: the engine thread may clear it meanwhile
        return ([active.req] if active else []) + list(self.queue)

    def wants(self, req: Request) -> bool:
        return self.prefiller.new_len(req) > self.chunk_tokens and req.params.prompt_logprobs is None

    def add(self, req: Request) -> None:
        self.queue.append(req)

    def drop_cancelled(self) -> list[Request]:
        gone = [r for r in self.requests() if r.cancelled]
        if self.active is not None and self.active.req.cancelled:
            self.active = None
        self.queue = deque(r for r in self.queue if not r.cancelled)
        return gone

    def discard_finished(self) -> None:
        """Forget queued requests the engine already ended (a failed step that had just admitted them)."""
        self.queue = deque(r for r in self.queue if not r.finished)

    def drop_active(self) -> Request | None:
        """The request in progress, removed (its chunk raised)."""
        req, self.active = (self.active.req if self.active else None), None
        return req

    def step(self, alone: bool) -> Prefilled | None:
        """Feed the next chunk of the request in progress (starting the next one if none), a larger
        one when no row is decoding (`alone`); its result once the whole prompt is in."""
        if self.active is None:
            if not self.queue:
                return None
            self.active = InProgress(self.queue.popleft(), 0, None)
        job = self.active
        if job.inputs is None:
            job.start, job.inputs = self.prefiller.begin_row(job.req)
        size = self.alone_tokens if alone else self.chunk_tokens
        chunk, job.inputs = job.inputs[:size], job.inputs[size:]  # [C, H], [L - C, H]
        logits = self.prefiller.prefill_chunk(job.req, job.start, chunk)
        job.start += chunk.shape[0]
        if job.inputs.shape[0]:
            return None
        self.active = None
        self.prefiller.publish(job.req)
        return Prefilled(job.req, job.start, logits)
