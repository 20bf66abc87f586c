"""The engine: one thread owns the model and every device tensor.

Loop: take new requests, let the scheduler pick who joins (switching merged phases
when the batch is empty), prefill the joiners together, run one decode step for
every row, emit tokens to each request's asyncio queue, drop finished rows.
The event loop only submits requests and awaits their events.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from server.adapters.lora import MergedState, merge
from server.engine.batch import Batch, scored_rows
from server.engine.cache import KVCache
from server.engine.clock import AdapterClock
from server.engine.logprobs import TokenLogprob, token_logprobs
from server.engine.prefill import Prefiller
from server.engine.request import (
    DoneEvent,
    Event,
    Mode,
    PromptLogprobsEvent,
    Request,
    TokenEvent,
)
from server.engine.sampling import Sampler, SamplingParams, next_tokens
from server.engine.scheduler import SHARED, Limits, Scheduler
from server.errors import HotswapError, QueueFullError, ShuttingDownError
from server.metrics import Metrics
from server.model import BaseModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineSettings:
    max_batch_size: int = 32
    max_batch_tokens: int = 65536
    max_prefill_tokens: int = 4096
    max_waiting: int = 256
    phase_quantum_s: float = 2.0
    prefix_cache: bool = True


class Engine:
    def __init__(
        self,
        base: BaseModel,
        settings: EngineSettings,
        metrics: Metrics,
        release: Callable[[Request], None] = lambda req: None,
    ) -> None:
        g = base.geometry
        self.base = base
        self.settings = settings
        self.metrics = metrics
        self._release = release
        cache = KVCache(g.n_layers, g.n_kv_heads, g.head_dim, settings.max_batch_size, g.max_len, base.dtype, base.device)
        self.batch = Batch(cache)
        self.clock = AdapterClock(base.device)
        self.prefiller = Prefiller(base, cache, settings)
        limits = Limits(settings.max_batch_size, settings.max_batch_tokens, settings.phase_quantum_s)
        self.scheduler = Scheduler(limits)
        self._inbox: queue.SimpleQueue[Request] = queue.SimpleQueue()
        self._pending = 0  # submitted and not yet admitted; guarded by _lock
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._merged: MergedState | None = None
        self._thread = threading.Thread(target=self._run, name="hotswap-engine", daemon=True)
        self.ready = threading.Event()

    # ---- event-loop side -------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float) -> None:
        """Stop taking requests, let the running ones finish (bounded), then end the thread."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout_s)

    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def waiting(self) -> int:
        return self._pending

    @property
    def running(self) -> int:
        return len(self.batch)

    async def generate(self, prompt_ids: list[int], params: SamplingParams, adapter, mode: Mode) -> AsyncIterator[Event]:
        """Submit a request and yield its events; leaving early cancels it."""
        loop = asyncio.get_running_loop()
        req = Request(prompt_ids, params, adapter, mode, loop, asyncio.Queue())
        try:
            self._submit(req)
        except (QueueFullError, ShuttingDownError):
            self._release(req)
            raise
        done = False
        try:
            while not done:
                event = await req.queue.get()
                done = isinstance(event, DoneEvent)
                yield event
        finally:
            if not done:
                req.cancelled = True
                self._wake.set()

    def _submit(self, req: Request) -> None:
        if self._stopping:
            raise ShuttingDownError("the server is shutting down and accepts no new requests")
        with self._lock:
            if self._pending >= self.settings.max_waiting:
                raise QueueFullError(self._pending)
            self._pending += 1
        self._inbox.put(req)
        self._wake.set()

    # ---- engine thread ---------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            self.prefiller.warm_up()
            self.ready.set()
            while not (self._stopping and not self.batch and not self.scheduler and self._inbox.empty()):
                self._wait_for_work()
                try:
                    self._iteration()
                except Exception as exc:  # noqa: BLE001 - a failed step must not kill the server
                    log.exception("engine step failed; failing the rows of this batch")
                    self._fail_all(exc)
            self._switch_phase(SHARED)

    def _wait_for_work(self) -> None:
        if not self.batch and not self.scheduler and self._inbox.empty():
            self._wake.wait(timeout=0.5)
            self._wake.clear()

    def _iteration(self) -> None:
        self._intake()
        if not self.batch and self.scheduler:
            self._switch_phase(self.scheduler.next_phase())
        joiners = self.scheduler.admit(self.batch.rows)
        if joiners:
            with self._lock:
                self._pending -= len(joiners)
            self._prefill(joiners)
        if self.batch:
            self._decode()
        self.metrics.set_queue(len(self.batch), self._pending)

    def _intake(self) -> None:
        while not self._inbox.empty():
            self.scheduler.add(self._inbox.get_nowait())
        for req in self.scheduler.drop_cancelled():
            with self._lock:
                self._pending -= 1
            self._finish(req, "cancelled", status="cancelled")

    def _switch_phase(self, phase: str) -> None:
        if phase == self.scheduler.phase and (phase == SHARED) == (self._merged is None):
            return
        if self._merged is not None:
            t0 = time.perf_counter()
            self._merged.restore()
            self._merged = None
            self.metrics.restored(time.perf_counter() - t0)
        if phase != SHARED:
            adapter = next(r.adapter for r in self.scheduler.waiting if r.phase == phase)
            t0 = time.perf_counter()
            try:
                self._merged = merge(self.base.hf, adapter.weights)
            except HotswapError as exc:
                self._fail_waiting(phase, exc)
                phase = SHARED
            else:
                self.metrics.merged(time.perf_counter() - t0)
        self.scheduler.enter(phase)

    def _fail_waiting(self, phase: str, exc: Exception) -> None:
        """The phase cannot run (its merge was refused): end its waiting requests with the error."""
        for req in self.scheduler.take_phase(phase):
            with self._lock:
                self._pending -= 1
            self._finish(req, "error", status="error", error=exc)

    def _prefill(self, joiners: list[Request]) -> None:
        now = time.perf_counter()
        for req in joiners:
            req.admitted = now
            req.sampler = Sampler.for_params(req.params, self.base.device)
        for group, lengths, logits, scores in self.prefiller.run(joiners, row0=len(self.batch)):
            for req, length, score in zip(group, lengths, scores):
                self.batch.join(req, length)
                if score is not None:
                    req.emit(PromptLogprobsEvent(tuple(score)))
            live = [i for i, r in enumerate(group) if r.params.max_new_tokens > 0]  # 0: scored only, never sampled
            rows = [group[i] for i in live]
            logits = logits if len(live) == len(group) else logits[live]
            tokens, lps = self._pick(logits, rows, scored_rows(rows))
            for req, token, lp in zip(rows, tokens, lps):
                self._accept(req, token, lp)
        self._drop_finished()

    def _pick(self, logits: Tensor, rows: list[Request], scored: list[int]) -> tuple[list[int], list[TokenLogprob | None]]:
        """logits: [N, V] -> the next token of each row and, for the `scored` rows, its logprob and top-N."""
        tokens = next_tokens(logits, [r.sampler for r in rows])
        lps: list[TokenLogprob | None] = [None] * len(rows)
        if scored:
            idx = torch.tensor(scored, device=logits.device)
            chosen = torch.tensor([tokens[i] for i in scored], device=logits.device)
            n_top = [rows[i].params.logprobs for i in scored]
            for i, lp in zip(scored, token_logprobs(logits[idx], chosen, n_top)):
                lps[i] = lp
        return tokens, lps

    def _decode(self) -> None:
        batch = self.batch
        batch.cache.ensure(max(batch.lengths) + 1)
        t0 = time.perf_counter()
        measured = self.clock.begin_step()
        ids = torch.tensor([[r.output_ids[-1]] for r in batch.rows], device=self.base.device)  # [N, 1]
        logits = self.prefiller.decode_logits(ids, batch, self.clock)
        tokens, lps = self._pick(logits, batch.rows, batch.scored())
        self.metrics.step(batch.kinds(), time.perf_counter() - t0, len(batch))
        if measured:
            self._record_adapter_time(batch.kinds(), self.clock.end_step())
        for i, (req, token, lp) in enumerate(zip(batch.rows, tokens, lps)):
            batch.lengths[i] += 1
            self._accept(req, token, lp)
        self._drop_finished()

    def _record_adapter_time(self, kinds: str, seconds: dict[str, float]) -> None:
        """Per kind in the batch: its measured adapter time (merged LoRA and soft prompts add none per step)."""
        for label in kinds.split("+"):
            if label == "lora_unmerged":
                self.metrics.adapter_layer("lora", "unmerged", seconds.get("lora", 0.0))
            elif label == "lora_merged":
                self.metrics.adapter_layer("lora", "merged", 0.0)
            elif label in ("bottleneck", "prompt"):
                self.metrics.adapter_layer(label, None, seconds.get(label, 0.0))

    def _accept(self, req: Request, token: int, logprob: TokenLogprob | None) -> None:
        if req.first_token is None:
            req.first_token = time.perf_counter()
        req.output_ids.append(token)
        req.emit(TokenEvent(token, logprob))

    def _drop_finished(self) -> None:
        for i in range(len(self.batch) - 1, -1, -1):
            req = self.batch.rows[i]
            reason = "cancelled" if req.cancelled else self._finish_reason(req)
            if reason:
                self.batch.leave(i)
                self._finish(req, reason, status="cancelled" if reason == "cancelled" else "ok")

    def _finish_reason(self, req: Request) -> str | None:
        p = req.params
        if not req.output_ids:  # max_new_tokens 0: scored at prefill, nothing to generate
            return "length"
        if not p.ignore_eos and req.output_ids[-1] in self.base.eos_ids:
            return "stop"
        if p.stop and self._hit_stop(req):
            return "stop"
        if len(req.output_ids) >= p.max_new_tokens:
            return "length"
        return None

    def _hit_stop(self, req: Request) -> bool:
        longest = max(len(s) for s in req.params.stop)
        tail = self.base.tokenizer.decode(req.output_ids[-(longest + 4) :])
        return any(s in tail for s in req.params.stop)

    def _finish(self, req: Request, reason: str, status: str, error: Exception | None = None) -> None:
        req.emit(DoneEvent(reason, error))
        self._release(req)
        self._record(req, status)

    def _record(self, req: Request, status: str) -> None:
        end = time.perf_counter()
        queued = (req.admitted or end) - req.arrived
        ttft = (req.first_token - req.arrived) if req.first_token else None
        n_out = len(req.output_ids)
        tpot = (end - req.first_token) / (n_out - 1) if req.first_token and n_out > 1 else None
        self.metrics.request_finished(
            req.kind, req.mode, status,
            duration_s=end - req.arrived, queue_s=queued, ttft_s=ttft, tpot_s=tpot,
            prompt_tokens=len(req.prompt_ids), completion_tokens=n_out,
            adapter=req.adapter.name if req.adapter else None,
        )

    def _fail_all(self, exc: Exception) -> None:
        while self.batch:
            req = self.batch.leave(len(self.batch) - 1)
            self._finish(req, "error", status="error", error=exc)
