"""The engine hands events to the requests' event loops in batches (engine/outbox.py): every request
gets all its events, in order, and a loop is woken once per hand-over, not once per token; a first
token does not wait for later work. And an engine that cannot warm up is reported, not waited for;
one on a base an earlier engine left with a LoRA plan in place warms up and serves."""
from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from server.adapters.lora import LoraPlan, ensure_wrapped, load_lora
from server.engine.engine import Engine, EngineSettings, EngineStartError
from server.engine.outbox import Outbox
from server.engine.prefill import Prefiller
from server.engine.request import DoneEvent, Request, TokenEvent
from server.engine.sampling import SamplingParams
from server.metrics import Metrics
from server.model import load_base_model
from tests.conftest import FIXTURES, LLAMA


class CountingLoop(asyncio.SelectorEventLoop):
    """An event loop that counts the calls handed to it from other threads (each one a wake-up)."""

    handovers = 0

    def call_soon_threadsafe(self, *args, **kwargs):
        self.handovers += 1
        return super().call_soon_threadsafe(*args, **kwargs)


def _request(loop: asyncio.AbstractEventLoop) -> Request:
    return Request([1, 2], SamplingParams(max_new_tokens=4), None, "none", loop, asyncio.Queue())


def test_one_flush_wakes_each_loop_once_and_keeps_each_requests_order():
    loop = CountingLoop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        reqs = asyncio.run_coroutine_threadsafe(_requests(loop, 3), loop).result(5)
        outbox = Outbox()
        for token in range(5):
            for req in reqs:
                outbox.put(req, TokenEvent(token))
        for req in reqs:
            outbox.put(req, DoneEvent("length"))
        before = loop.handovers
        outbox.flush()
        outbox.flush()  # nothing held: no wake-up
        assert loop.handovers - before == 1
        got = [asyncio.run_coroutine_threadsafe(_drain(req), loop).result(5) for req in reqs]
        assert got == [[0, 1, 2, 3, 4, "length"]] * 3
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


async def _requests(loop: asyncio.AbstractEventLoop, n: int) -> list[Request]:
    return [_request(loop) for _ in range(n)]


async def _drain(req: Request) -> list:
    events = []
    while not events or not isinstance(events[-1], DoneEvent):
        events.append(await req.queue.get())
    return [e.finish_reason if isinstance(e, DoneEvent) else e.token_id for e in events]


def test_a_closed_loop_cancels_its_requests_and_spares_the_others():
    closed, live = asyncio.new_event_loop(), CountingLoop()
    closed.close()
    gone, waiting = _request(closed), _request(live)
    outbox = Outbox()
    outbox.put(gone, TokenEvent(7))
    outbox.put(waiting, TokenEvent(8))
    outbox.flush()  # does not raise
    assert gone.cancelled and not waiting.cancelled
    live.run_until_complete(asyncio.sleep(0))  # runs the hand-over
    assert waiting.queue.get_nowait() == TokenEvent(8)
    live.close()


def test_a_decode_step_of_many_rows_wakes_the_loop_once():
    """16 rows of 12 tokens: each gets its 12 tokens and then its end, and the loop is woken a few
    times per engine iteration (after the prefill, after the decode step), not once per token."""
    base = load_base_model(LLAMA, device="cpu", dtype="float32")
    engine = Engine(base, EngineSettings(max_batch_size=16), Metrics())
    engine.start()
    engine.wait_ready()
    loop = CountingLoop()
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)

    async def one(seed: int) -> tuple[int, bool]:
        prompt = torch.randint(2, 200, (5 + seed,), generator=torch.Generator().manual_seed(seed)).tolist()
        events = [event async for event in engine.generate(prompt, params, None, "none")]
        tokens = [e for e in events if isinstance(e, TokenEvent)]
        return len(tokens), events[-1] == DoneEvent("length") and events.index(events[-1]) == len(tokens)

    async def every() -> list[tuple[int, bool]]:
        return await asyncio.gather(*(one(seed) for seed in range(16)))

    try:
        results = loop.run_until_complete(every())
    finally:
        engine.stop(30)
        loop.close()
    assert results == [(12, True)] * 16
    assert loop.handovers <= 2 * 12 + 4  # 16 x 13 = 208 events; one hand-over each before


def test_a_prefill_groups_first_tokens_go_out_before_the_next_groups_forward(monkeypatch):
    """Joiners prefilled in two groups (--max-prefill-tokens fits one prompt): the first group's first
    token is handed to its loop before the second group's forward runs, not after."""
    base = load_base_model(LLAMA, device="cpu", dtype="float32")
    engine = Engine(base, EngineSettings(max_batch_size=4, max_prefill_tokens=40, prefill_chunk_tokens=64), Metrics())
    loop = CountingLoop()
    seen = []
    prefill = Prefiller.prefill
    monkeypatch.setattr(Prefiller, "prefill", lambda self, group: seen.append(loop.handovers) or prefill(self, group))
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)

    async def one(seed: int) -> int:
        prompt = torch.randint(2, 200, (30,), generator=torch.Generator().manual_seed(seed)).tolist()
        return len([e async for e in engine.generate(prompt, params, None, "none") if isinstance(e, TokenEvent)])

    async def both() -> list[int]:
        jobs = [asyncio.ensure_future(one(seed)) for seed in (0, 1)]
        await asyncio.sleep(0.05)  # both submitted before the engine runs: they join in one iteration
        engine.start()
        return await asyncio.gather(*jobs)

    try:
        assert loop.run_until_complete(both()) == [3, 3]
    finally:
        engine.stop(30)
        loop.close()
    assert len(seen) == 2 and seen[1] > seen[0]  # the first group's events went out between the two


def test_an_engine_that_fails_to_warm_up_is_reported_not_waited_for(monkeypatch):
    base = load_base_model(LLAMA, device="cpu", dtype="float32")

    def broken(self) -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(Prefiller, "warm_up", broken)
    engine = Engine(base, EngineSettings(), Metrics())
    engine.start()
    with pytest.raises(EngineStartError, match="illegal memory access"):
        engine.wait_ready()


def test_an_engine_on_a_base_whose_wrappers_hold_an_earlier_plan_warms_up_and_serves_the_base():
    """An earlier engine's last step left a 3-row LoRA plan on the base's wrappers: the next engine on
    the same base warms up on a base row and serves base rows the base model's tokens."""
    base = load_base_model(LLAMA, device="cpu", dtype="float32")
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    prompt = [5, 9, 300, 17]

    def tokens(engine: Engine) -> list[int]:
        async def run() -> list[int]:
            return [e.token_id async for e in engine.generate(prompt, params, None, "none") if isinstance(e, TokenEvent)]
        engine.start()
        try:
            engine.wait_ready()
            return asyncio.run(run())
        finally:
            engine.stop(30)
    want = tokens(Engine(base, EngineSettings(max_batch_size=4), Metrics()))
    adapter = load_lora(FIXTURES / "peft" / "tiny-llama" / "lora-all-r16", base.hf)
    ensure_wrapped(base.hf, adapter.modules, base.lora_ctx)
    base.lora_ctx.plan = LoraPlan.build([adapter] * 3)
    assert tokens(Engine(base, EngineSettings(max_batch_size=4), Metrics())) == want
