"""The engine: one thread owns the model and every device tensor.

Loop: run the calls other threads handed in (adapter placement, DoRA norms), take new requests,
let the scheduler pick who joins (switching merged phases when the batch is empty), prefill the
joiners together (prompts longer than a chunk: one chunk per iteration, server/engine/chunks.py),
run one decode step for every row, drop finished rows; after each stage the requests' events go to
their asyncio queues, one hand-over per event loop (server/engine/outbox.py).
The event loop only submits requests and awaits their events.

Faults stay with their request. Whatever raises while admitting, prefilling, decoding or
sampling a row ends that request with a typed error (its row freed, its adapter released) and
the other rows go on: a prefill group or decode step that raises is retried row by row, so the
row at fault is found and the others get the tokens they would have got alone. Non-finite
logits end their row with an error naming the adapter. A merge is a transaction (see
lora_layer.merge). Only what cannot be pinned to a row fails the rows of that step, never the
waiting ones.
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

from server.engine.batch import Batch, scored_rows
from server.engine.cache import KVCache, initial_blocks
from server.engine.calls import EngineCalls
from server.engine.chunks import ChunkedPrefill, chunk_tokens
from server.engine.clock import AdapterClock
from server.engine.faults import describe, failed, non_finite, step_failed
from server.engine.graphs import DecodeGraphs, cuda_capture, uncapturable
from server.engine.logprobs import TokenLogprob, token_logprobs
from server.engine.outbox import Outbox
from server.engine.phases import Phases
from server.engine.prefill import Prefiller
from server.engine.records import record_adapter_time, record_finished
from server.engine.request import (
    DoneEvent,
    Event,
    Mode,
    PromptLogprobsEvent,
    Request,
    TokenEvent,
)
from server.engine.sampling import Sampler, SamplingParams, next_tokens
from server.engine import threads
from server.engine.scheduler import SHARED, Limits, Scheduler
from server.engine.stops import StopFinder
from server.engine.waiting import Promise, WaitingRoom
from server.errors import QueueFullError, ShuttingDownError
from server.metrics import Metrics
from server.model import BaseModel

log = logging.getLogger(__name__)
ABORT_JOIN_S = 10.0  # after the shutdown timeout: how long the thread gets to end the rows left
READY_POLL_S = 0.2  # wait_ready: how often it checks that the thread still runs


class EngineStartError(RuntimeError):
    """The engine thread ended while warming up (a first forward or graph capture raised)."""


@dataclass(frozen=True)
class EngineSettings:
    max_batch_size: int = 32
    max_batch_tokens: int = 65536
    max_prefill_tokens: int = 4096
    max_waiting: int = 256
    phase_quantum_s: float = 2.0
    prefix_cache: bool = True
    prompt_cache: bool = True  # share full KV blocks of prompts between requests (engine/prompt_cache.py)
    prefill_chunk_tokens: int = 0  # prompts longer than this are prefilled a chunk per step; 0: by device
    kv_block_tokens: int = 16  # positions per KV-cache block
    threads: int = 0  # CPU threads of the engine's ops, the other threads' default left at one; 0: as they are
    cuda_graphs: bool = True  # on CUDA, decode steps replay captured graphs where they can (engine/graphs.py)


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
        self.cache = KVCache(g.n_layers, g.n_kv_heads, g.head_dim, g.max_len, base.dtype, base.device,
                             settings.kv_block_tokens, initial_blocks(settings, g.max_len, base.device))
        self.batch = Batch()
        self.clock = AdapterClock(base.device)
        self.prefiller = Prefiller(base, self.cache, settings)
        self.graphs = _graphs(self.prefiller, settings, base.device)
        self.chunked = ChunkedPrefill(self.prefiller, chunk_tokens(settings.prefill_chunk_tokens, base.device),
                                      settings.max_prefill_tokens)
        limits = Limits(settings.max_batch_size, settings.max_batch_tokens, settings.phase_quantum_s)
        self.scheduler = Scheduler(limits)
        self._inbox: queue.SimpleQueue[Request] = queue.SimpleQueue()
        self.room = WaitingRoom(settings.max_waiting, metrics)  # submitted, not yet admitted
        self._wake = threading.Event()
        self._stopping = False
        self._abort: ShuttingDownError | None = None  # set past the shutdown timeout: end every request
        self._joining: list[Request] = []  # admitted this iteration, not yet rows of the batch
        self.outbox = Outbox()  # the requests' events, handed to their loops after each stage
        self.stops = StopFinder(base.tokenizer)
        self.phases = Phases(base, self.scheduler, metrics, self._fail_waiting)
        self._thread = threading.Thread(target=self._run, name="hotswap-engine", daemon=True)
        self.calls = EngineCalls(self._thread, self._wake)
        self.call = self.calls.call  # what the registry runs here: base weight reads, device placement
        self.ready = threading.Event()
        self._start_error: Exception | None = None  # what ended the thread before `ready`

    # ---- event-loop side -------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float) -> None:
        """Stop taking requests, let the running ones finish (bounded), then end the thread.

        Requests still running after `timeout_s` end with ShuttingDownError (503)."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self._abort = ShuttingDownError(
                f"the server is shutting down and this request did not finish within --shutdown-timeout-s "
                f"({timeout_s:g}s); retry it on another replica")
            self._wake.set()
            self._thread.join(ABORT_JOIN_S)

    def wait_ready(self) -> None:
        """Block until the engine thread has warmed up; EngineStartError if it ended first."""
        while not self.ready.wait(READY_POLL_S):
            if not self._thread.is_alive():
                raise EngineStartError(f"the engine thread ended before it was ready: {self._start_error!r}")

    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def waiting(self) -> int:
        return self.room.waiting

    @property
    def running(self) -> int:
        """Admitted rows: decoding, or prefilling a long prompt in chunks (the gateway state counts both)."""
        return len(self.batch) + len(self.chunked)

    async def generate(self, prompt_ids: list[int], params: SamplingParams, adapter, mode: Mode,
                       promise: Promise | None = None) -> AsyncIterator[Event]:
        """Submit a request (on a place of `promise`, one choice of a request let in whole) and yield
        its events; leaving early cancels it."""
        loop = asyncio.get_running_loop()
        req = Request(prompt_ids, params, adapter, mode, loop, asyncio.Queue())
        try:
            self._submit(req, promise)
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

    def _submit(self, req: Request, promise: Promise | None) -> None:
        if self._stopping:
            raise ShuttingDownError("the server is shutting down and accepts no new requests")
        self.room.enter(req.kind, req.mode, req.adapter_names, promise)
        self._inbox.put(req)
        self._wake.set()

    # ---- engine thread ---------------------------------------------------------------

    def _run(self) -> None:
        if self.base.device.type == "cuda":  # streams, graphs and Triton launches go to the model's device
            torch.cuda.set_device(self.base.device)
        if self.settings.threads:
            threads.claim(self.settings.threads)
        with torch.inference_mode():
            try:
                self._warm_up()
            except Exception as exc:  # noqa: BLE001 - reported by wait_ready: the server does not start
                log.exception("engine warm-up failed")
                self._start_error = exc
                return
            self.ready.set()
            while not self._done():
                self._wait_for_work()
                try:
                    self._iteration()
                except Exception as exc:  # noqa: BLE001 - a failed step must not kill the server
                    log.exception("engine step failed where no row could be blamed; ending the rows of this step")
                    self._fail_step(exc)
                finally:
                    self.outbox.flush()
            if self._abort is not None:
                self._end_everything(self._abort)
                self.outbox.flush()  # before the restore, which may raise
            try:
                self.phases.switch(SHARED)
            finally:
                self.outbox.flush()
            self.calls.run_pending()

    def _warm_up(self) -> None:
        self.prefiller.warm_up()
        if self.graphs is not None:
            self.graphs.warm_up()

    def _done(self) -> bool:
        idle = not self.batch and not self.chunked and not self.scheduler and self._inbox.empty()
        return self._abort is not None or (self._stopping and idle)

    def _wait_for_work(self) -> None:
        if not self.batch and not self.chunked and not self.scheduler and self._inbox.empty() and not self.calls:
            self._wake.wait(timeout=0.5)
            self._wake.clear()

    def _iteration(self) -> None:
        self.calls.run_pending()
        self._intake()
        if not self.batch and not self.chunked and self.scheduler:
            self.phases.switch(self.scheduler.next_phase())
        joiners = self.scheduler.admit(self.batch.rows + self.chunked.requests())
        if joiners:
            self.room.leave(len(joiners))
            self._joining = joiners
            whole = []
            for req in self._set_up(joiners):
                if self.chunked.wants(req):
                    self.chunked.add(req)
                else:
                    whole.append(req)
            self._prefill(whole)
            self._joining = []
        if self.chunked:
            self._prefill_chunk()
            self.outbox.flush()
        if self.batch:
            self._decode()
        self.metrics.set_queue(self.running, self.room.waiting)
        per_block = self.cache.bytes_per_block
        self.metrics.set_kv_cache(self.cache.blocks_used * per_block, self.cache.blocks_cached * per_block,
                                  self.cache.n_blocks * per_block)

    def _intake(self) -> None:
        while not self._inbox.empty():
            self.scheduler.add(self._inbox.get_nowait())
        for req in self.scheduler.drop_cancelled():
            self.room.leave()
            self._finish(req, "cancelled", status="cancelled")
        for req in self.chunked.drop_cancelled():
            self._finish(req, "cancelled", status="cancelled")

    def _fail_waiting(self, phase: str, exc: Exception) -> None:
        """The phase cannot run (its merge was refused): end its waiting requests with the error."""
        for req in self.scheduler.take_phase(phase):
            self.room.leave()
            self._finish(req, "error", status="error", error=exc)

    def _set_up(self, joiners: list[Request]) -> list[Request]:
        """Admission: each joiner's sampler; those whose set-up raised end here, the others are returned."""
        now = time.perf_counter()
        ready = []
        for req in joiners:
            req.admitted = now
            try:
                req.sampler = Sampler.for_params(req.params, self.base.device)
            except Exception as exc:  # noqa: BLE001 - e.g. a seed torch refuses: this request only
                self._finish(req, "error", status="error", error=failed("setting up sampling", exc))
            else:
                ready.append(req)
        return ready

    def _prefill(self, joiners: list[Request]) -> None:
        for group in self.prefiller.groups(joiners):
            self._prefill_group(group)
            self.outbox.flush()  # a group's first tokens out before the next group's forward
        self._drop_finished()
        self.outbox.flush()  # and the ends (set-up failures, requests done at their first token) before the decode step

    def _prefill_group(self, group: list[Request]) -> None:
        """Prefill a group into the next cache rows; if it raises, each row alone, so only the faulty one fails."""
        try:
            lengths, logits, scores = self.prefiller.prefill(group)
        except Exception as exc:  # noqa: BLE001 - pinned to its row below
            if len(group) == 1:
                log.warning("prefill failed for request %d: %s", group[0].id, describe(exc))
                self._finish(group[0], "error", status="error", error=failed("prefill", exc))
                return
            for req in group:
                self._prefill_group([req])
            return
        for req, length, score in zip(group, lengths, scores):
            self.batch.join(req, length)
            if score is not None:
                self.outbox.put(req, PromptLogprobsEvent(tuple(score)))
        live = [i for i, r in enumerate(group) if r.params.max_new_tokens > 0]  # 0: scored only, never sampled
        rows = [group[i] for i in live]
        self._sample(rows, logits if len(live) == len(group) else logits[live], scored_rows(rows))

    def _prefill_chunk(self) -> None:
        """One chunk of the long prompt in progress; once it is all in, the row joins the batch."""
        try:
            done = self.chunked.step(alone=not self.batch)
        except Exception as exc:  # noqa: BLE001 - this request's fault
            req = self.chunked.drop_active()
            if req is not None:
                self._finish(req, "error", status="error", error=failed("prefill", exc))
            return
        if done is None:
            return
        self.batch.join(done.req, done.length)
        self._sample([done.req], done.logits, scored_rows([done.req]))
        self._drop_finished()

    def _sample(self, rows: list[Request], logits: Tensor, scored: list[int]) -> None:
        """logits: [N, V] of `rows` -> each row's next token accepted, or the row marked failed."""
        picks = next_tokens(logits, [r.sampler for r in rows])
        lps: list[TokenLogprob | None] = [None] * len(rows)
        if scored:
            idx = torch.tensor(scored, device=logits.device)
            chosen = torch.tensor([picks.tokens[i] for i in scored], device=logits.device)
            n_top = [rows[i].params.logprobs for i in scored]
            for i, lp in zip(scored, token_logprobs(logits[idx], chosen, n_top)):
                lps[i] = lp
        for i in picks.non_finite:
            rows[i].failure = non_finite(rows[i])
        for i, exc in picks.errors.items():
            rows[i].failure = failed("sampling", exc)
        for i, req in enumerate(rows):
            if req.failure is None:
                self._accept(req, picks.tokens[i], lps[i])

    def _decode(self) -> None:
        batch = self.batch
        t0 = time.perf_counter()
        measured = self.clock.begin_step()
        try:
            if self.graphs is not None and self.graphs.serves(batch, measured):
                logits = self.graphs.logits(batch)  # [N, V]
            else:
                logits = self.prefiller.decode_logits(self._last_ids(), batch, self.clock)  # [N, V]
            good, scored = list(range(len(batch))), batch.scored()
        except Exception as exc:  # noqa: BLE001 - pinned to its row by decoding each alone
            log.warning("decode step failed (%s); decoding each row alone", describe(exc))
            measured = False
            good, logits = self._decode_alone(self._last_ids())
            scored = scored_rows([batch.rows[i] for i in good])
        if good:
            self._sample([batch.rows[i] for i in good], logits, scored)
        self.metrics.step(batch.kinds(), time.perf_counter() - t0, len(batch))
        if measured:
            record_adapter_time(self.metrics, batch.kinds(), self.clock.end_step())
        for i in range(len(batch)):
            batch.lengths[i] += 1
        self._drop_finished()

    def _last_ids(self) -> Tensor:
        """[N, 1] each row's last token, on the device (a graphed step packs its own)."""
        return torch.tensor([[r.output_ids[-1]] for r in self.batch.rows], device=self.base.device)

    def _decode_alone(self, ids: Tensor) -> tuple[list[int], Tensor | None]:
        """ids: [N, 1] -> (rows that decoded, their logits [G, V]); the others are marked failed."""
        good, outs = [], []
        for i, req in enumerate(self.batch.rows):
            try:
                outs.append(self.prefiller.decode_row(ids[i : i + 1], self.batch, i))  # [1, V]
            except Exception as exc:  # noqa: BLE001 - this row's fault
                req.failure = failed("decoding", exc)
            else:
                good.append(i)
        return good, torch.cat(outs) if outs else None

    def _accept(self, req: Request, token: int, logprob: TokenLogprob | None) -> None:
        if req.first_token is None:
            req.first_token = time.perf_counter()
        req.output_ids.append(token)
        self.outbox.put(req, TokenEvent(token, logprob))

    def _drop_finished(self) -> None:
        for i in range(len(self.batch) - 1, -1, -1):
            req = self.batch.rows[i]
            if req.failure is not None:
                self.batch.leave(i)
                self._finish(req, "error", status="error", error=req.failure)
                continue
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
        if p.stop and self.stops.found(req.output_ids, p.stop):
            return "stop"
        if len(req.output_ids) >= p.max_new_tokens:
            return "length"
        return None

    def _finish(self, req: Request, reason: str, status: str, error: Exception | None = None) -> None:
        if req.finished:
            return
        req.finished = True
        self.cache.release(req.kv)
        self.outbox.put(req, DoneEvent(reason, error, req.cached_tokens))
        self._release(req)
        try:
            record_finished(self.metrics, req, status)
        except Exception:  # noqa: BLE001 - it has ended; a fault in its metrics must not end the other rows
            log.exception("recording the metrics of request %d failed", req.id)

    def _fail_step(self, exc: Exception) -> None:
        """A fault no row could be blamed for: end the rows of this step (running and joining), not the waiting."""
        error = step_failed(exc)
        active = self.chunked.drop_active()
        for req in self._joining + ([active] if active else []):
            self._finish(req, "error", status="error", error=error)
        self._joining = []
        self.chunked.discard_finished()
        while self.batch:
            self._finish(self.batch.leave(len(self.batch) - 1), "error", status="error", error=error)

    def _end_everything(self, error: Exception) -> None:
        """Past the shutdown timeout: every request still here ends with `error`."""
        while not self._inbox.empty():
            self.scheduler.add(self._inbox.get_nowait())
        for req in [*self.batch.rows, *self.chunked.requests(), *self.scheduler.waiting]:
            self._finish(req, "error", status="error", error=error)
        while self.batch:
            self.batch.leave(len(self.batch) - 1)
        self.scheduler.waiting.clear()


def _graphs(prefiller: Prefiller, settings: EngineSettings, device: torch.device) -> DecodeGraphs | None:
    """Decode graphs on CUDA unless turned off or the model's forward cannot be captured; None elsewhere
    (a CPU step has no launches to save)."""
    if not settings.cuda_graphs or device.type != "cuda":
        return None
    if (why := uncapturable(prefiller.base.hf)) is not None:
        log.info("CUDA graphs off: %s", why)
        return None
    return DecodeGraphs(prefiller, settings.max_batch_size, cuda_capture(device))
